-- Stage records behind their predecessors (pipelined ordered lanes): the worker that finishes the
-- predecessor starts them. ARGV: epoch, live ms, then pairs of predecessor offset and staged value.
-- Returns the (1-based) indexes of the pairs that belong on the lane instead: their predecessor
-- has released them already, or the partition has a newer owner (whose workers fence them).
local e, live = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local fenced = tonumber(redis.call('GET', K_EPOCH) or '0') > e
local late = {}
for i = 3, #ARGV, 2 do
  local prev = tonumber(ARGV[i])
  if fenced or released(prev, e, now, live) then
    table.insert(late, (i - 1) / 2)
  else
    redis.call('HSET', K_STAGED, prev, ARGV[i + 1])
  end
end
return late
