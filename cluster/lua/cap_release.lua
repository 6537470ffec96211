-- cap_release.lua: a request leaves the model: it finished (its final service
-- is counted), or it gave up waiting (timeout, client gone). Dispatches the
-- next waiting requests.
--
-- Units: times in ms, counters in counter units, integers only.
-- KEYS[1..9] and ARGV[1..6]: see capacity.lua. ARGV[7] entry id;
-- ARGV[8] the entry's counter units in all (a running total; 0 for a waiter).
-- Returns 1 if the entry was waiting or running, else 0. Idempotent.

local a = cap_args()
local entry, total = ARGV[7], tonumber(ARGV[8])
local account = redis.call('HGET', KEYS[2], entry)
local removed = 0
if account then
  charge(entry, account, total)
  removed = redis.call('ZREM', KEYS[1], entry) + redis.call('ZREM', KEYS[3], entry)
  redis.call('ZREM', KEYS[4], entry)
  forget(entry)
end
expire(a.now)
fill(a)
if removed > 0 then return 1 end
return 0
