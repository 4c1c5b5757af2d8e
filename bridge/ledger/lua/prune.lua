-- Drop facts below the committed offset (ARGV[1]): Kafka's committed offset covers them.
local floor = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', K_DONE, '-inf', '(' .. floor)
if floor > tonumber(redis.call('GET', K_FLOOR) or '-1') then redis.call('SET', K_FLOOR, floor) end
for _, key in ipairs({K_FAILED, K_ATTEMPTS, K_BEATS, K_STAGED, K_RUNNING, K_DIED}) do
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if tonumber(field) < floor then redis.call('HDEL', key, field) end
  end
end
return 1
