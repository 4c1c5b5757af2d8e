-- A final failure the bridge decided itself (a record too large for the task broker): recorded
-- like a worker's, so that the successor waiting for it starts at once. ARGV: offset, epoch,
-- detail JSON, channel.
local o, e = tonumber(ARGV[1]), tonumber(ARGV[2])
if is_done(o) then return 0 end
local fe = failure_epoch(o)
if fe == nil or fe < e then redis.call('HSET', K_FAILED, o, ARGV[3]) end
redis.call('PUBLISH', ARGV[4], o)
return 1
