-- When each lane was last registered. KEYS: the lanes' registration times (a sorted set).
-- ARGV: lane names.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, lane in ipairs(ARGV) do redis.call('ZADD', KEYS[1], now, lane) end
return 1
