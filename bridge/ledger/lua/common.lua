-- Shared by the ledger's per-partition scripts. Every script takes the keys of one partition,
-- in this order (one Redis Cluster hash slot):
local K_EPOCH, K_DONE, K_RUNNING, K_ATTEMPTS, K_FAILED, K_FLOOR, K_FRESH, K_BEATS, K_STAGED, K_DIED = unpack(KEYS)

-- The one clock every liveness decision uses.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function floor_offset()
  return tonumber(redis.call('GET', K_FLOOR) or '-1')
end

-- Below the floor a record is done even once pruning dropped its fact: a copy of it that the task
-- broker hands out late (a dead worker's unacknowledged message) must not run again.
local function is_done(o)
  return redis.call('ZSCORE', K_DONE, o) ~= false or o < floor_offset()
end

-- The copy registered for offset o (bridge/protocol.py, Registration), or nil. Entries written by
-- version 1 workers lack k and s.
local function parse_registration(raw)
  if not raw then return nil end
  local c = cjson.decode(raw)
  c.e = tonumber(c.e or 0)
  c.a = tonumber(c.a or 1)
  c.r = tonumber(c.r or 0)
  c.t = tonumber(c.t or 0)
  c.s = c.s or 'run'
  c.k = c.k or ''
  return c
end

local function registration(o)
  return parse_registration(redis.call('HGET', K_RUNNING, o))
end

local function register(o, e, a, r, k, w, t, s)
  redis.call('HSET', K_RUNNING, o, cjson.encode({e = e, a = a, r = r, k = k, w = w, t = t, s = s}))
end

-- Copies of one record are ordered by (epoch, attempt, retries): a newer epoch is the current
-- owner's, a higher attempt the bridge's re-dispatch, more retries dramatiq's later try.
local function newer(c, e, a, r)
  if c.e ~= e then return c.e > e end
  if c.a ~= a then return c.a > a end
  return c.r > r
end

local function runs(c, now, live)
  return c ~= nil and c.s == 'run' and now - c.t < live
end

local function failure_epoch(o)
  local raw = redis.call('HGET', K_FAILED, o)
  if not raw then return nil end
  -- Failures written by version 1 workers carry no epoch: they count as current.
  return tonumber(cjson.decode(raw).e or math.huge)
end

-- Whether predecessor p, named by a record of epoch e, lets that record start: no copy of p
-- runs, and p is done, or failed for good in epoch e or later. A failure of an older epoch is
-- the older owner's business: the current owner runs p again or settles it itself.
local function released(p, e, now, live)
  if p < 0 or p < floor_offset() then return true end
  if runs(registration(p), now, live) then return false end
  if is_done(p) then return true end
  local fe = failure_epoch(p)
  return fe ~= nil and fe >= e
end

-- Codes: 0 fenced (older epoch), 1 run, 2 done already, 3 superseded (a newer copy exists),
-- 4 wait for the predecessor, 5 wait for another copy of this record that is running.
-- Returns the code and the retry count the copy continues with (a copy that takes over from a
-- scheduled retry or a dead copy carries their count, so max_retries holds across copies).
-- decide judges from what the caller read: whether o is done, the partition's epoch, o's attempt
-- number and its registered copy c; the predecessor is start's business.
local function decide(e, a, r, k, done, epoch, attempts, c, now, live)
  if done then return 2, r end
  if epoch > e then return 0, r end
  if a < attempts then return 3, r end
  if c ~= nil and c.k ~= k then
    if newer(c, e, a, r) then return 3, r end
    -- dramatiq enqueues the retry of a try only after that try ended: a registered try of the
    -- same copy with a lower count does not run any more, even before its own finish says so.
    local retried = c.e == e and c.a == a and c.r < r
    if runs(c, now, live) and not retried then return 5, r end
    if c.r > r then r = c.r end
  end
  return 1, r
end

-- Whether the registered copy c died while running: another copy's, registered as running, no
-- sign of life for live, and not the try whose retry this copy (e, a, r, k) is. Each death is
-- counted once: by the copy that takes over (its registration replaces c), or by the bridge's
-- look at records without progress (stale.lua), which marks c dead.
local function died(c, e, a, r, k, now, live)
  if c == nil or c.k == k or c.s ~= 'run' or runs(c, now, live) then return false end
  return not (c.e == e and c.a == a and c.r < r)
end

local function start(o, e, a, r, k, w, prev, live, now)
  local c = registration(o)
  local dead = died(c, e, a, r, k, now, live)
  local code
  code, r = decide(e, a, r, k, is_done(o), tonumber(redis.call('GET', K_EPOCH) or '0'),
    tonumber(redis.call('HGET', K_ATTEMPTS, o) or '1'), c, now, live)
  if code == 2 then redis.call('RPUSH', K_FRESH, o) end
  if code ~= 1 then return code, r end
  if not released(prev, e, now, live) then return 4, r end
  if dead then redis.call('HINCRBY', K_DIED, o, 1) end
  register(o, e, a, r, k, w, now, 'run')
  return 1, r
end

-- Records the end of one try of o (common to finish.lua and finish_many.lua). Outcomes: 'done',
-- 'failed' (final) or 'retry' (dramatiq holds the next try in a delay queue for delay ms).
-- Returns true when o reached a final state that its successors and the owning bridge must hear
-- of (the caller announces it).
local function ends(o, outcome, e, a, r, k, detail, delay, worker, now)
  local c = registration(o)
  local own = c ~= nil and c.k == k
  local current = tonumber(redis.call('GET', K_EPOCH) or '0')
  local outdated = a < tonumber(redis.call('HGET', K_ATTEMPTS, o) or '1') or (c ~= nil and not own and newer(c, e, a, r))
  if outcome == 'retry' then
    -- A scheduled retry stays alive until its eta, and its retry count goes with it; dramatiq has
    -- raised the message's count for the retry already. If the retry started meanwhile, its own
    -- registration stands.
    if (own or c == nil) and not outdated and current <= e and not is_done(o) then
      register(o, e, a, r, k, worker, now + delay, 'retry')
    end
    return false
  end
  if own then redis.call('HDEL', K_RUNNING, o) end
  redis.call('HDEL', K_BEATS, o)
  if outcome == 'done' then
    redis.call('ZADD', K_DONE, o, o)
    redis.call('HDEL', K_FAILED, o)
    redis.call('HDEL', K_ATTEMPTS, o)
    redis.call('RPUSH', K_FRESH, o)
    return true
  end
  if is_done(o) or outdated then return false end
  -- Only the newest copy's final failure counts; a later epoch's replaces an older one's, and
  -- within one epoch the first detail stays (after_nack repeats it).
  local fe = failure_epoch(o)
  if fe == nil or fe < e then redis.call('HSET', K_FAILED, o, detail) end
  redis.call('RPUSH', K_FRESH, 'f' .. o)
  return true
end
