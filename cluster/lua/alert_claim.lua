-- alert_claim.lua: claim one usage-alert crossing, or re-arm it, atomically.
--
-- Units: times in ms.
-- KEYS[1] alert state hash   packserve:{A}:alerts       <bar>:<threshold> -> 'f:<ms>' fired | 'a:<ms>' re-armed
-- KEYS[2] due zset           packserve:alerts:due       alert id -> due ms
-- KEYS[3] payload hash       packserve:alerts:event     alert id -> JSON payload
-- ARGV[1] name <bar>:<threshold>; ARGV[2] '1' above the threshold, '0' below;
-- ARGV[3] observation time ms (the store's time of the snapshot); ARGV[4] alert id; ARGV[5] JSON payload.
-- Returns 1 if this call claimed the crossing (the alert is queued), else 0.
-- Once per crossing: a bar above its threshold fires once; it fires again only
-- after an observation below the threshold re-armed it. An observation older
-- than the last transition changes nothing (a slow gateway cannot re-fire).
-- KEYS[2..3] are global (see redis_store.py on Redis Cluster).

local state = redis.call('HGET', KEYS[1], ARGV[1])
local kind, at = nil, 0
if state then
  kind = string.sub(state, 1, 1)
  at = tonumber(string.sub(state, 3))
end
local now = tonumber(ARGV[3])
if now < at then return 0 end
if ARGV[2] == '1' then
  if kind == 'f' then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], 'f:' .. ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
  return 1
end
if kind == 'f' then redis.call('HSET', KEYS[1], ARGV[1], 'a:' .. ARGV[3]) end
return 0
