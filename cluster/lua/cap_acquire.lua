-- cap_acquire.lua: a request asks to be dispatched on a model (joins the wait, or is granted).
--
-- Units: times in ms, counters in counter units, integers only.
-- KEYS[1..8] and ARGV[1..5]: see capacity.lua. ARGV[6] account id;
-- ARGV[7] entry id (the request's; also its lease id once dispatched);
-- ARGV[8] wait ttl ms (a waiter that stops asking is dropped after this);
-- ARGV[9] '1' to join, '0' to ask again for an entry that joined before.
-- Returns {'granted', lease expiry ms}, {'waiting', waiting count,
-- earliest lease expiry ms or ''}, or {'gone'} (asked again, and the entry
-- left or was dropped: a late ask must not put back what a release took out).
-- Idempotent per entry id: asking again keeps the entry's place and returns
-- its grant once it has one.

local a = cap_args()
local account, entry, wait_ttl, join = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9] == '1'
expire(a.now)
local held = redis.call('ZSCORE', KEYS[1], entry)
if held then return {'granted', held} end
local queued = redis.call('ZSCORE', KEYS[3], entry)
if not queued and not join then return {'gone'} end
if not queued then
  activate(account)
  redis.call('HSET', KEYS[2], entry, account)
  redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[7], 'seq', 1), entry)
end
redis.call('ZADD', KEYS[4], fmt(a.now + wait_ttl), entry)
fill(a, entry)
held = redis.call('ZSCORE', KEYS[1], entry)
if held then return {'granted', held} end
return {'waiting', fmt(redis.call('ZCARD', KEYS[3])), earliest_expiry()}
