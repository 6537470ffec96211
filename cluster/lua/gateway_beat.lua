-- gateway_beat.lua: write one gateway's heartbeat; forget the gateways whose heartbeat ran out.
--
-- Units: times in ms.
-- KEYS[1] zset  packserve:gateways   gateway id -> expiry ms (live while expiry > now)
-- KEYS[2] hash  packserve:gateway    gateway id -> '<seen ms>|<JSON beat>' (cluster/observations.py)
-- ARGV[1] now ms or '' (Redis TIME); ARGV[2] gateway id; ARGV[3] JSON beat; ARGV[4] TTL ms.
-- Returns {seen ms, expiry ms}.

local now = clock(ARGV[1])
local expires = now + tonumber(ARGV[4])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now))) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
redis.call('ZADD', KEYS[1], fmt(expires), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], fmt(now) .. '|' .. ARGV[3])
return {now, expires}
