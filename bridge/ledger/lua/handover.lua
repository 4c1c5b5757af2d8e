-- What a new owner must know before it dispatches: records of older epochs still running (it
-- waits for them in ordered modes), and the final states recorded from an offset on.
-- ARGV: epoch, live ms, from offset. Returns {running offsets, done offsets, {offset, detail, ...}}.
local e, live, from = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local older = {}
local entries = redis.call('HGETALL', K_RUNNING)
for i = 1, #entries, 2 do
  local c = registration(entries[i])
  if c.e < e and runs(c, now, live) then table.insert(older, tonumber(entries[i])) end
end
local failed = {}
local details = redis.call('HGETALL', K_FAILED)
for i = 1, #details, 2 do
  if tonumber(details[i]) >= from then
    table.insert(failed, tonumber(details[i]))
    table.insert(failed, details[i + 1])
  end
end
return {older, redis.call('ZRANGEBYSCORE', K_DONE, from, '+inf'), failed}
