-- The bridge's look at dispatched records that showed no progress for a while.
-- ARGV: timeout ms, then offsets. For each offset: done, failed for good (with its detail), or no
-- sign of life for the timeout (then a new attempt is numbered for it, and older copies of it are
-- superseded). A scheduled retry's sign of life lies at its eta. Returns
-- {done offsets, {offset, detail, ...}, {offset, attempt, ...}}.
local timeout = tonumber(ARGV[1])
local now = now_ms()
local done, failed, again = {}, {}, {}
for i = 2, #ARGV do
  local o = tonumber(ARGV[i])
  if is_done(o) then
    table.insert(done, o)
  else
    local detail = redis.call('HGET', K_FAILED, o)
    if detail then
      table.insert(failed, o)
      table.insert(failed, detail)
    else
      local seen = 0
      local c = registration(o)
      if c ~= nil then seen = c.t end
      local beat = tonumber(redis.call('HGET', K_BEATS, o) or '0')
      if beat > seen then seen = beat end
      if now - seen > timeout then
        redis.call('HSETNX', K_ATTEMPTS, o, 1)
        table.insert(again, o)
        table.insert(again, redis.call('HINCRBY', K_ATTEMPTS, o, 1))
      end
    end
  end
end
return {done, failed, again}
