-- The bridge's look at dispatched records that showed no progress for a while.
-- ARGV: timeout ms, the most runs after a death (max_redispatches, -1: no limit), the owner's epoch,
-- the finished channel, live ms, then offsets. For each offset: done; failed for good (with its
-- detail); stuck: its workers died running it more often than the limit allows and no copy of it
-- runs now, so it is given up as a final failure (older copies superseded, waiting successors told,
-- the successor staged behind it handed back to the bridge); or without a sign of life for the
-- timeout: a new attempt is numbered for it, and older copies of it are superseded. A scheduled
-- retry's sign of life lies at its eta; a copy registered as running without one for live ms died,
-- which is counted once (the copy is marked dead).
-- Returns {done offsets, {offset, detail, ...}, {offset, attempt, ...}, {offset, detail, successor
-- offset or -1, ...}}.
local timeout, limit, e, channel = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local live = tonumber(ARGV[5])
local now = now_ms()
local owner = tonumber(redis.call('GET', K_EPOCH) or '0') <= e
local done, failed, again, stuck = {}, {}, {}, {}
for i = 6, #ARGV do
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
      local silent = now - seen > timeout
      if c ~= nil and c.s == 'run' and not runs(c, now, live) then
        redis.call('HINCRBY', K_DIED, o, 1)
        register(o, c.e, c.a, c.r, c.k, c.w, c.t, 'dead')
        c.s = 'dead'
      end
      -- Deaths also count when the task broker ran the record again by itself (a dead worker's
      -- unacknowledged message): a record can crash its workers without ever looking silent. It
      -- is never given up while a copy of it runs.
      local deaths = tonumber(redis.call('HGET', K_DIED, o) or '0')
      local give_up = owner and limit >= 0 and deaths > limit and not runs(c, now, live)
      if silent or give_up then
        redis.call('HSETNX', K_ATTEMPTS, o, 1)
        local attempt = redis.call('HINCRBY', K_ATTEMPTS, o, 1)
        if give_up then
          local worker = ''
          if c ~= nil and c.w then worker = ', on worker ' .. c.w end
          local last = 'no sign of life recorded'
          if seen > 0 then last = string.format('last sign of life %.1fs before it was given up%s', (now - seen) / 1000,
            worker) end
          local reason = cjson.encode({
            reason = 'stuck',
            error = {type = 'Stuck', message = string.format(
              '%d runs ended without a sign of life (their worker died or was killed), more than '
              .. 'max_redispatches=%d allows; %s', deaths, limit, last)},
            attempts = deaths, last_seen_ms = seen, e = e,
          })
          redis.call('HSET', K_FAILED, o, reason)
          local successor = -1
          local queued = redis.call('HGET', K_STAGED, o)
          if queued then
            redis.call('HDEL', K_STAGED, o)
            successor = tonumber(string.match(queued, '^(%d+)|'))
          end
          redis.call('PUBLISH', channel, o)
          table.insert(stuck, o)
          table.insert(stuck, reason)
          table.insert(stuck, successor)
        else
          table.insert(again, o)
          table.insert(again, attempt)
        end
      end
    end
  end
end
return {done, failed, again, stuck}
