-- renew.lua: extend a lease that is still held.
--
-- Units: times in ms, integers only.
-- KEYS[1] leases zset      packserve:{A}:lease:<model>   lease_id -> expiry ms
-- ARGV[1] now ms or '' (Redis TIME); ARGV[2] lease_id; ARGV[3] ttl ms.
-- Returns 1 if renewed, 0 if the lease is gone or expired (its slot may
-- already belong to someone else, so it must not come back).

local now = clock(ARGV[1])
local expires = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not expires or tonumber(expires) <= now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', fmt(now + tonumber(ARGV[3])), ARGV[2])
return 1
