-- The end of one try of a batch: every offset it carried settles in this one call, so the commit
-- never sees part of a batch final. The batch's copy is registered under its first offset.
-- ARGV: leader offset, epoch, attempt, retries, token, worker, channel, next (the first offset of
-- the records dramatiq retries, -1 for none), retry delay ms, number of done offsets, number of
-- failed offsets, then the done offsets, then (offset, detail JSON) per failed offset.
-- Returns the number of offsets that reached a final state here.
local leader, e, a, r, k = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local worker, channel = ARGV[6], ARGV[7]
local next_leader, delay = tonumber(ARGV[8]), tonumber(ARGV[9])
local n_done, n_failed = tonumber(ARGV[10]), tonumber(ARGV[11])
local now = now_ms()

local c = registration(leader)
local own = c ~= nil and c.k == k
local outdated = a < tonumber(redis.call('HGET', K_ATTEMPTS, leader) or '1') or (c ~= nil and not own and newer(c, e, a, r))
if own or c == nil then
  redis.call('HDEL', K_RUNNING, leader)
  redis.call('HDEL', K_BEATS, leader)
end
-- dramatiq holds the retry in a delay queue: alive until its eta, with its retry count. If the
-- retry started meanwhile (its delay can be shorter than this write), its own registration stands.
local retry = next_leader >= 0 and registration(next_leader) or nil
if next_leader >= 0 and not outdated and tonumber(redis.call('GET', K_EPOCH) or '0') <= e
    and not is_done(next_leader) and (retry == nil or retry.k == k) then
  register(next_leader, e, a, r, k, worker, now + delay, 'retry')
end

-- Successes are final whichever copy reports them; written in chunks (unpack has a bounded stack).
local settled = 0
local first_failed = 12 + n_done
local i = 12
while i < first_failed do
  local last = math.min(i + 499, first_failed - 1)
  local run, scored = {}, {}
  for j = i, last do
    table.insert(run, ARGV[j])
    table.insert(scored, ARGV[j])
    table.insert(scored, ARGV[j])
  end
  redis.call('HDEL', K_RUNNING, unpack(run))
  redis.call('HDEL', K_FAILED, unpack(run))
  redis.call('HDEL', K_ATTEMPTS, unpack(run))
  redis.call('ZADD', K_DONE, unpack(scored))
  redis.call('RPUSH', K_FRESH, unpack(run))
  settled = settled + #run
  i = last + 1
end
-- Only the newest copy's final failure counts (as in ends()).
if not outdated then
  for j = first_failed, first_failed + 2 * n_failed - 1, 2 do
    local o = tonumber(ARGV[j])
    if not is_done(o) then
      local fe = failure_epoch(o)
      if fe == nil or fe < e then redis.call('HSET', K_FAILED, o, ARGV[j + 1]) end
      redis.call('RPUSH', K_FRESH, 'f' .. o)
      settled = settled + 1
    end
  end
end
if settled > 0 then redis.call('PUBLISH', channel, 'batch') end
return settled
