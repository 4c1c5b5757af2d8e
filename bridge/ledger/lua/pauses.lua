-- An operator's pause or resume, recorded as one command. A script rather than MULTI: redis-py's
-- cluster client runs no transactions before 6.x, and the group's keys share one hash slot.
-- KEYS: the group's pauses, its control hash. ARGV: the command JSON, the field to add ('' for
-- none) and its value, then the fields to remove. Returns the new command version.
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
if #ARGV > 3 then redis.call('HDEL', KEYS[1], unpack(ARGV, 4)) end
local version = redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('HSET', KEYS[2], 'last', ARGV[1])
return version
