-- Take back the records the owner staged in epoch ARGV[1] (an operator pause, a skip): no finish
-- starts them any more, and the owner dispatches them again later. Atomic with the finishes that
-- start staged records, so each one either started already or is taken back here. Returns the
-- offsets taken back.
local taken = {}
local staged = redis.call('HGETALL', K_STAGED)
for i = 1, #staged, 2 do
  local so, se = string.match(staged[i + 1], '^(%d+)|(%d+)|')
  if se == ARGV[1] then
    redis.call('HDEL', K_STAGED, staged[i])
    table.insert(taken, tonumber(so))
  end
end
return taken
