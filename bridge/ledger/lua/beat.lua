-- Signs of life from one worker process. ARGV: count of running copies n, then n triples of
-- offset, token and registration JSON (bridge/protocol.py, registration_json), then the offsets of
-- records parked there. A running copy refreshes its own registration only; one the ledger lost
-- (flushed, restarted without persistence) is registered again, so a new owner still waits for it.
local now = now_ms()
local n = tonumber(ARGV[1])
for i = 2, 1 + 3 * n, 3 do
  local o, k = tonumber(ARGV[i]), ARGV[i + 1]
  local c = registration(o)
  if c ~= nil then
    -- A copy the bridge took for dead (stale.lua) that shows life after all runs again.
    if c.k == k and (c.s == 'run' or c.s == 'dead') then
      register(o, c.e, c.a, c.r, c.k, c.w, now, 'run')
    end
  elseif not is_done(o) and redis.call('HEXISTS', K_FAILED, o) == 0 then
    local entry = cjson.decode(ARGV[i + 2])
    register(o, tonumber(entry.e), tonumber(entry.a), tonumber(entry.r), entry.k, entry.w, now, 'run')
  end
end
for i = 2 + 3 * n, #ARGV do
  redis.call('HSET', K_BEATS, ARGV[i], now)
end
return 1
