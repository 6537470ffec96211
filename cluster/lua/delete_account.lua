-- delete_account.lua: remove an account and everything stored about it.
--
-- Units: none.
-- KEYS[1] account hash     packserve:{A}:account
-- KEYS[2] keys hash        packserve:{A}:keys       key id -> JSON key record
-- KEYS[3] revoked set      packserve:{A}:revoked
-- KEYS[4] models set       packserve:{A}:models
-- KEYS[5] settled zset     packserve:{A}:settled
-- KEYS[6] usage stream     packserve:{A}:usage
-- KEYS[7] spend hash       packserve:{A}:spend
-- KEYS[8] account index    packserve:accounts
-- KEYS[9] key-hash index   packserve:keyhash        sha256 hex -> JSON key record (active keys)
-- KEYS[10] key-id index    packserve:keyid          key id -> account id
-- ARGV[1] account id; ARGV[2] per-account key prefix 'packserve:{A}:';
-- ARGV[3] wake-up channel prefix 'packserve:wake:{A}:'.
-- Per-model keys (lease:, queue:, qexp:<model>) are found through the models
-- set; they share the account's hash slot. KEYS[8..10] are global, so on a
-- Redis Cluster this script would have to be split (see redis_store.py).
-- Returns 1 if the account existed, else 0 (stray keys are cleaned anyway).

local existed = redis.call('EXISTS', KEYS[1])
local keys = redis.call('HGETALL', KEYS[2])
for i = 1, #keys, 2 do
  local record = cjson.decode(keys[i + 1])
  local indexed = redis.call('HGET', KEYS[9], record.hash)
  if indexed and cjson.decode(indexed).id == keys[i] then redis.call('HDEL', KEYS[9], record.hash) end
  redis.call('HDEL', KEYS[10], keys[i])
end
for _, model in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('DEL', ARGV[2] .. 'lease:' .. model, ARGV[2] .. 'queue:' .. model, ARGV[2] .. 'qexp:' .. model)
  -- Queued requests learn at once that the account is gone.
  redis.call('PUBLISH', ARGV[3] .. model, 'deleted')
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
-- Per-key bars, alert states, refusal history: same hash slot.
redis.call('DEL', ARGV[2] .. 'keybars', ARGV[2] .. 'alerts', ARGV[2] .. 'refusals')
redis.call('ZREM', KEYS[8], ARGV[1])
return existed
