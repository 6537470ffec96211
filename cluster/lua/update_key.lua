-- update_key.lua: replace an API key's limits (allow-list, expiry, disabled, caps).
--
-- Units: none (times and caps are inside the JSON record: ms, whole requests, picodollars).
-- KEYS[1] keys hash        packserve:{A}:keys       key id -> JSON key record
-- KEYS[2] revoked set      packserve:{A}:revoked
-- KEYS[3] key-hash index   packserve:keyhash        sha256 hex -> JSON key record (active keys)
-- ARGV[1] key id; ARGV[2] the new JSON record (same id and hash).
-- Returns 1 if updated, 0 if the key is unknown or revoked.
-- The key's bars are kept: a changed cap carries them over by their remaining
-- fraction on next use (each level records the capacity it was written against).

local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record or redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
local hash = cjson.decode(record).hash
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], hash, ARGV[2])
return 1
