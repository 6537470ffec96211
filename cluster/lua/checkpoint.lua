-- checkpoint.lua: keep what to settle for a lease if its gateway dies mid-response.
--
-- Units: times in ms, integers only.
-- KEYS[1] due zset         packserve:checkpoints   lease_id -> due ms
-- KEYS[2] settlements hash packserve:checkpoint    lease_id -> msgpack Settlement
-- ARGV[1] now ms or '' (Redis TIME); ARGV[2] lease_id; ARGV[3] ttl ms;
-- ARGV[4] encoded settlement. Replaces an earlier checkpoint of the lease.
-- Returns the due time.

local now = clock(ARGV[1])
local due = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], fmt(due), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
return due
