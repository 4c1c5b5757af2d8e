-- The group's offset of this partition was reset (kafka-dramatiq-bridge reset-offsets, no bridge
-- running): the ledger forgets what it knew (records done, failed, staged or running, attempts,
-- deaths), so the next owner neither skips records from the new offset on nor dead-letters them
-- unrun, and a new epoch fences every message of the old run still on a lane or in a delay queue.
-- Refused while a copy runs: its end would write a done fact the next owner trusts.
-- ARGV: the new offset, live ms. Returns {1, epoch}, or {0, offsets of the running copies}.
local now, live = now_ms(), tonumber(ARGV[2])
local running = {0}
local entries = redis.call('HGETALL', K_RUNNING)
for i = 1, #entries, 2 do
  if runs(parse_registration(entries[i + 1]), now, live) then table.insert(running, tonumber(entries[i])) end
end
if #running > 1 then return running end
local epoch = math.max(tonumber(redis.call('GET', K_EPOCH) or '0') + 1, now)
-- KEEPTTL: a partition nobody owns keeps expiring (assignments.py, retire).
redis.call('SET', K_EPOCH, epoch, 'KEEPTTL')
redis.call('SET', K_FLOOR, ARGV[1], 'KEEPTTL')
redis.call('DEL', K_DONE, K_RUNNING, K_ATTEMPTS, K_FAILED, K_FRESH, K_BEATS, K_STAGED, K_DIED)
return {1, epoch}
