-- revoke_key.lua: revoke an API key; find_key no longer finds it.
--
-- Units: none.
-- KEYS[1] keys hash        packserve:{A}:keys       key id -> JSON key record
-- KEYS[2] revoked set      packserve:{A}:revoked
-- KEYS[3] key-hash index   packserve:keyhash
-- ARGV[1] key id.
-- Returns 1 if revoked now, 0 if unknown or already revoked.

local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
local hash = cjson.decode(record).hash
local indexed = redis.call('HGET', KEYS[3], hash)
if indexed and cjson.decode(indexed).id == ARGV[1] then redis.call('HDEL', KEYS[3], hash) end
return 1
