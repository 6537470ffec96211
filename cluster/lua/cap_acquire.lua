-- cap_acquire.lua: a request asks to be dispatched on a model (joins the wait, or is granted).
--
-- Units: times in ms, counters in counter units, integers only.
-- KEYS[1..9] and ARGV[1..6]: see capacity.lua. ARGV[7] account id;
-- ARGV[8] entry id (the request's; also its lease id once dispatched);
-- ARGV[9] wait ttl ms (a waiter that stops asking is dropped after this);
-- ARGV[10] '1' to join, '0' to ask again for an entry that joined before.
-- Returns {'granted', lease expiry ms, account to pause or ''}, {'waiting', waiting count,
-- earliest lease expiry ms or ''}, or {'gone'} (asked again, and the entry
-- left or was dropped: a late ask must not put back what a release took out).
-- Idempotent per entry id: asking again keeps the entry's place and returns
-- its grant once it has one.

local a = cap_args()
local account, entry, wait_ttl, join = ARGV[7], ARGV[8], tonumber(ARGV[9]), ARGV[10] == '1'
expire(a.now)
local held = redis.call('ZSCORE', KEYS[1], entry)
if held then return {'granted', held, redis.call('HGET', KEYS[9], entry) or ''} end
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
if held then return {'granted', held, redis.call('HGET', KEYS[9], entry) or ''} end
return {'waiting', fmt(redis.call('ZCARD', KEYS[3])), earliest_expiry()}
