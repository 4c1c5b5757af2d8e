-- Final failures the bridge has handled (dead-lettered, or the policy says advance) become done
-- facts. ARGV: offsets. One script rather than MULTI: redis-py's cluster client runs no
-- transactions before 6.x, and a script on one partition's keys stays in one slot.
for _, o in ipairs(ARGV) do
  redis.call('ZADD', K_DONE, tonumber(o), o)
  redis.call('HDEL', K_FAILED, o)
  redis.call('HDEL', K_ATTEMPTS, o)
end
return #ARGV
