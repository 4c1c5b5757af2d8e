-- A bridge's look at the operators' commands and its sign of presence, in one round trip.
-- KEYS: the group's control hash, pauses, requests, bridges (one hash slot: the group's).
-- ARGV: the bridge's name, how many partitions it owns.
-- Returns {version, last command JSON or false, pauses {field, value, ...}, requests {id, value, ...},
-- the Redis clock in ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
redis.call('HSET', KEYS[4], ARGV[1], cjson.encode({t = now, v = version, owned = tonumber(ARGV[2])}))
return {version, redis.call('HGET', KEYS[1], 'last'), redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
  now}
