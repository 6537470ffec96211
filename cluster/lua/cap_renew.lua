-- cap_renew.lua: a dispatched request is still streaming: extend its lease, grow its account's counter.
--
-- Units: times in ms, counters in counter units, integers only.
-- KEYS[1..9] and ARGV[1..6]: see capacity.lua. ARGV[7] entry id;
-- ARGV[8] the entry's counter units so far (a running total).
-- Returns 1 if renewed, 0 if its lease is gone (expired: its sequence may be
-- someone else's now, so it does not come back).

local a = cap_args()
local entry, total = ARGV[7], tonumber(ARGV[8])
expire(a.now)
local renewed = 0
if redis.call('ZSCORE', KEYS[1], entry) then
  redis.call('ZADD', KEYS[1], 'XX', fmt(a.now + a.ttl), entry)
  charge(entry, redis.call('HGET', KEYS[2], entry), total)
  renewed = 1
end
fill(a)
return renewed
