-- ARGV: offset, epoch, attempt, retries, token, worker, predecessor (-1: none), live ms.
-- Returns {code, retries} (common.lua, start).
local code, retries = start(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), now_ms())
return {code, retries}
