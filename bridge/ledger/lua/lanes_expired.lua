-- Take the lanes nobody registered for ARGV[1] ms. KEYS: the lanes' registration times.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return gone
