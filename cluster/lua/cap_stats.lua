-- cap_stats.lua: one model's load, for /metrics and /admin/v1/stats.
--
-- Units: times in ms, counters in counter units, integers only.
-- KEYS[1..9] and ARGV[1..6]: see capacity.lua (expired leases are dropped and
-- the freed sequences dispatched first, as every capacity script does).
-- Returns {capacity, in flight, waiting, account, counter, running, waiting, ...}
-- with one (account, counter, running, waiting) group per active account.

local a = cap_args()
expire(a.now)
fill(a)
local running, waiting = per_account(KEYS[1]), per_account(KEYS[3])
local out = {fmt(a.capacity), fmt(redis.call('ZCARD', KEYS[1])), fmt(redis.call('ZCARD', KEYS[3]))}
for _, account in ipairs(redis.call('HKEYS', KEYS[5])) do
  out[#out + 1] = account
  out[#out + 1] = fmt(counter_of(account))
  out[#out + 1] = fmt(running[account] or 0)
  out[#out + 1] = fmt(waiting[account] or 0)
end
return out
