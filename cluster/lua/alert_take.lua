-- alert_take.lua: take due usage alerts for delivery, pushing each one's next try back.
--
-- Units: times in ms.
-- KEYS[1] due zset           packserve:alerts:due       alert id -> due ms
-- KEYS[2] payload hash       packserve:alerts:event     alert id -> JSON payload
-- KEYS[3] attempts hash      packserve:alerts:tries     alert id -> delivery attempts so far
-- ARGV[1] now ms; ARGV[2] at most this many; ARGV[3] backoff base ms; ARGV[4] backoff cap ms.
-- Returns a flat list id, payload, attempts (this one included) for each alert taken.
-- Taking one makes it due again after min(base * 2^(attempts-1), cap): if the
-- sender dies or the receiver fails, it is retried then (at least once); a
-- sender that succeeds deletes it (alert_done in redis_store.py).

local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local payload = redis.call('HGET', KEYS[2], id)
  if payload then
    local attempts = redis.call('HINCRBY', KEYS[3], id, 1)
    local delay = math.min(tonumber(ARGV[3]) * 2 ^ (attempts - 1), tonumber(ARGV[4]))
    redis.call('ZADD', KEYS[1], string.format('%.0f', tonumber(ARGV[1]) + delay), id)
    out[#out + 1] = id
    out[#out + 1] = payload
    out[#out + 1] = attempts
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
