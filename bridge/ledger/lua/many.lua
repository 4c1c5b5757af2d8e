-- The ends of tries no successor waits for (none mode) and the starts of copies no predecessor
-- holds, of records of one partition, written together by a worker process: ends first, then
-- starts. ARGV: channel, worker, live ms, the number of ends, then eight values per end (offset,
-- outcome, epoch, attempt, retries, token, detail JSON, retry delay ms), then six per start
-- (offset, epoch, attempt, retries, token, worker). Returns {code, retries, ...} per start
-- (common.lua, decide).
local channel, worker, live = ARGV[1], ARGV[2], tonumber(ARGV[3])
local first_start = 5 + 8 * tonumber(ARGV[4])
local now = now_ms()
local announced = false

-- A run of successes is written with one call per key for the whole run (a success needs no look
-- at the record's copies: it is final whichever copy reports it); other ends one by one, in order.
local run, scored = {}, {}
local function write_run()
  if #run == 0 then return end
  redis.call('HDEL', K_RUNNING, unpack(run))
  redis.call('HDEL', K_BEATS, unpack(run))
  redis.call('HDEL', K_FAILED, unpack(run))
  redis.call('HDEL', K_ATTEMPTS, unpack(run))
  redis.call('ZADD', K_DONE, unpack(scored))
  redis.call('RPUSH', K_FRESH, unpack(run))
  announced = true
  run, scored = {}, {}
end
for i = 5, first_start - 1, 8 do
  if ARGV[i + 1] == 'done' then
    table.insert(run, ARGV[i])
    table.insert(scored, ARGV[i])
    table.insert(scored, ARGV[i])
  else
    write_run()
    if ends(tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]),
        ARGV[i + 5], ARGV[i + 6], tonumber(ARGV[i + 7]), worker, now) then
      announced = true
    end
  end
end
write_run()
if announced then redis.call('PUBLISH', channel, 'batch') end
if first_start > #ARGV then return {} end

-- What every start's verdict needs is read in five calls for all of them.
local offsets = {}
for i = first_start, #ARGV, 6 do table.insert(offsets, ARGV[i]) end
local done = redis.call('ZMSCORE', K_DONE, unpack(offsets))
local below = floor_offset()
local attempts = redis.call('HMGET', K_ATTEMPTS, unpack(offsets))
local running = redis.call('HMGET', K_RUNNING, unpack(offsets))
local epoch = tonumber(redis.call('GET', K_EPOCH) or '0')
-- Copies registered here, for a later copy of the same record in this call.
local registered = {}
local answers, fresh, entries = {}, {}, {}
for n = 1, #offsets do
  local i = first_start + (n - 1) * 6
  local o = offsets[n]
  local e, a, r, k = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), ARGV[i + 4]
  local c = registered[o]
  if c == nil then c = parse_registration(running[n]) end
  local dead = died(c, e, a, r, k, now, live)
  local code
  code, r = decide(e, a, r, k, done[n] ~= false or tonumber(o) < below, epoch, tonumber(attempts[n] or '1'), c,
    now, live)
  if code == 1 and dead then redis.call('HINCRBY', K_DIED, o, 1) end
  if code == 1 then
    registered[o] = {e = e, a = a, r = r, k = k, w = ARGV[i + 5], t = now, s = 'run'}
    table.insert(entries, o)
    table.insert(entries, cjson.encode(registered[o]))
  elseif code == 2 then
    table.insert(fresh, o)
  end
  table.insert(answers, code)
  table.insert(answers, r)
end
if #entries > 0 then redis.call('HSET', K_RUNNING, unpack(entries)) end
if #fresh > 0 then redis.call('RPUSH', K_FRESH, unpack(fresh)) end
return answers
