-- create_key.lua: store an API key (its sha256 only) and index it.
--
-- Units: none (created time is inside the JSON record, in ms).
-- KEYS[1] account hash     packserve:{A}:account
-- KEYS[2] keys hash        packserve:{A}:keys       key id -> JSON key record
-- KEYS[3] revoked set      packserve:{A}:revoked
-- KEYS[4] key-hash index   packserve:keyhash        sha256 hex -> JSON key record (active keys)
-- KEYS[5] key-id index     packserve:keyid          key id -> account id
-- ARGV[1] key id; ARGV[2] key hash; ARGV[3] JSON record; ARGV[4] account id;
-- ARGV[5] '1' if created already revoked.
-- Returns 'ok', 'missing' (no account), 'duplicate_id' or 'duplicate_hash'.

if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HEXISTS', KEYS[5], ARGV[1]) == 1 then return 'duplicate_id' end
if redis.call('HEXISTS', KEYS[4], ARGV[2]) == 1 then return 'duplicate_hash' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[4])
if ARGV[5] == '1' then
  redis.call('SADD', KEYS[3], ARGV[1])
else
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
end
return 'ok'
