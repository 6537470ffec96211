-- sync_plan.lua: bring an account's stored pack sums up to the operator's plans.
--
-- Units: none (whole requests, whole dollars, slots).
-- KEYS[1] account hash     packserve:{A}:account
-- ARGV[1] the packs field the sums were computed for;
-- ARGV[2..] field, value pairs (r_req w_usd c_std c_small).
-- Returns 1 if written, 0 if the account is gone, not a subscription, or its
-- packs changed meanwhile (set_plan wrote fresh sums then).
-- Bars are not touched: each level records the capacity it was written
-- against (rc, wc), so the next script carries it over (store.lua read_bar).

local acct = load_account(KEYS[1])
if acct == nil or acct.plan ~= 'subscription' or acct.packs ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
