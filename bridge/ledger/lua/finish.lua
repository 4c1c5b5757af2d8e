-- The end of one try of a record, and the start of the next record of its partition (key).
-- ARGV: offset, outcome ('done' | 'failed' | 'retry'), epoch, attempt, retries, token, detail JSON
-- (failed), retry delay ms (retry), live ms, channel, handoff ('1': take the staged successor),
-- worker, token for the staged successor, and optionally the successor parked in the same worker
-- process: offset, epoch, attempt, retries, token.
-- Returns {parked code, staged code, staged body, staged retries}; -1 where nothing was tried.
local o, outcome = tonumber(ARGV[1]), ARGV[2]
local e, a, r, k = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local live, channel, worker = tonumber(ARGV[9]), ARGV[10], ARGV[12]
local now = now_ms()
if not ends(o, outcome, e, a, r, k, ARGV[7], tonumber(ARGV[8]), worker, now) then return {-1, -1} end
redis.call('PUBLISH', channel, o)

local parked = -1
if #ARGV >= 18 then
  local code, retries = start(tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17]),
    ARGV[18], worker, o, live, now)
  if code == 1 then return {1, -1, false, retries} end
  parked = code
end
if ARGV[11] ~= '1' then return {parked, -1} end
-- The record the bridge staged behind this one starts now, skipping staged records that are done
-- already. A staged entry of an older epoch is fenced by start.
local prev = o
while true do
  local queued = redis.call('HGET', K_STAGED, prev)
  if not queued then return {parked, -1} end
  redis.call('HDEL', K_STAGED, prev)
  local so, se, sa, body = string.match(queued, '^(%d+)|(%d+)|(%d+)|(.*)$')
  local code, retries = start(tonumber(so), tonumber(se), tonumber(sa), 0, ARGV[13], worker, prev, live, now)
  if code ~= 2 then return {parked, code, body, retries} end
  prev = tonumber(so)
end
