-- active_leases.lua: number of unexpired leases on one (account, model).
--
-- Units: times in ms, integers only.
-- KEYS[1] leases zset      packserve:{A}:lease:<model>   lease_id -> expiry ms
-- ARGV[1] now ms or '' (Redis TIME).

local now = clock(ARGV[1])
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')
