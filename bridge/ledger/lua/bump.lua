-- A new assignment epoch: ARGV: committed offset (-1: none), the owner's last known epoch (0:
-- none). Epochs never go backwards, even after the ledger lost this key: the new one is at least
-- the Redis clock in ms. Older messages are fenced, re-dispatch numbering and staged records are
-- the old owner's, and the committed offset becomes the floor below which everything is done.
local hint = tonumber(ARGV[2])
local epoch = math.max(tonumber(redis.call('GET', K_EPOCH) or '0') + 1, hint + 1, now_ms())
redis.call('SET', K_EPOCH, epoch)
redis.call('DEL', K_ATTEMPTS, K_STAGED)
redis.call('SET', K_FLOOR, ARGV[1])
for _, key in ipairs(KEYS) do redis.call('PERSIST', key) end
return epoch
