-- An operator gives a record up (kafka-dramatiq-bridge skip): it counts as failed for good, with
-- the detail given (reason skipped; the owning bridge writes its dead letter, then settles it).
-- Its copies become outdated: a running one no longer holds its successors, its heartbeats do not
-- register it again, its end writes no failure and no retry, and a copy not yet started is
-- superseded. ARGV: offset, epoch of the owner, detail JSON, channel.
-- Returns 1 given up, 0 done already, 2 failed for good already in this epoch, 3 a newer owner.
local o, e = tonumber(ARGV[1]), tonumber(ARGV[2])
if is_done(o) then return 0 end
if tonumber(redis.call('GET', K_EPOCH) or '0') > e then return 3 end
local fe = failure_epoch(o)
if fe ~= nil and fe >= e then return 2 end
redis.call('HSET', K_FAILED, o, ARGV[3])
redis.call('HDEL', K_RUNNING, o)
redis.call('HDEL', K_BEATS, o)
redis.call('HSETNX', K_ATTEMPTS, o, 1)
redis.call('HINCRBY', K_ATTEMPTS, o, 1)
-- Successors parked in workers look again.
redis.call('PUBLISH', ARGV[4], o)
return 1
