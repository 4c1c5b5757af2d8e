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
local c = registration(o)
local own = c ~= nil and c.k == k
local current = tonumber(redis.call('GET', K_EPOCH) or '0')
local outdated = a < tonumber(redis.call('HGET', K_ATTEMPTS, o) or '1') or (c ~= nil and not own and newer(c, e, a, r))

if outcome == 'retry' then
  -- A scheduled retry stays alive until its eta, and its retry count goes with it; dramatiq has
  -- raised the message's count for the retry already. If the retry started meanwhile, its own
  -- registration stands.
  if (own or c == nil) and not outdated and current <= e and not is_done(o) then
    register(o, e, a, r, k, worker, now + tonumber(ARGV[8]), 'retry')
  end
  return {-1, -1}
end

if own then redis.call('HDEL', K_RUNNING, o) end
redis.call('HDEL', K_BEATS, o)
if outcome == 'done' then
  redis.call('ZADD', K_DONE, o, o)
  redis.call('HDEL', K_FAILED, o)
  redis.call('HDEL', K_ATTEMPTS, o)
  redis.call('RPUSH', K_FRESH, o)
  redis.call('PUBLISH', channel, o)
elseif not is_done(o) and not outdated then
  -- Only the newest copy's final failure counts; a later epoch's replaces an older one's, and
  -- within one epoch the first detail stays (after_nack repeats it).
  local fe = failure_epoch(o)
  if fe == nil or fe < e then redis.call('HSET', K_FAILED, o, ARGV[7]) end
  redis.call('RPUSH', K_FRESH, 'f' .. o)
  redis.call('PUBLISH', channel, o)
else
  return {-1, -1}
end

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
