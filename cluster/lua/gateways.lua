-- gateways.lua: the live gateways (heartbeat not yet expired), forgetting the others.
--
-- Units: times in ms.
-- KEYS[1] zset  packserve:gateways   gateway id -> expiry ms (live while expiry > now)
-- KEYS[2] hash  packserve:gateway    gateway id -> '<seen ms>|<JSON beat>' (cluster/observations.py)
-- ARGV[1] now ms or '' (Redis TIME).
-- Returns {now, id1, expiry1, record1, id2, ...}, by expiry.

local now = clock(ARGV[1])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now))) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local out = {now}
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #live, 2 do
  local record = redis.call('HGET', KEYS[2], live[i])
  if record then
    out[#out + 1] = live[i]
    out[#out + 1] = live[i + 1]
    out[#out + 1] = record
  end
end
return out
