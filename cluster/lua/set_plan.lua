-- set_plan.lua: change an account's plan, keeping its bars' remaining fractions.
--
-- Units: times in ms, request bar in request units, money in picodollars,
-- integers only.
-- KEYS[1] account hash     packserve:{A}:account
-- ARGV[1..6] bar config (store.lua); ARGV[7] now ms or '' (Redis TIME);
-- ARGV[8..] field, value pairs of the new plan (plan packs cap pconc r_req w_usd c_std c_small).
-- Returns {} if the account does not exist, else its HGETALL after the change.
-- Between two subscriptions the change happens now: each bar is settled under
-- its old capacity, then keeps its remaining fraction under the new one
-- (bar_rescale, policies.bars.rescale): a full bar stays full, an empty one
-- empty, and the running tick interval keeps its anchor.

local cfg = load_config()
local acct = load_account(KEYS[1])
if acct == nil then return {} end
local now = clock(ARGV[7])
local new = {}
for i = 8, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end

local function carry(level_field, anchor_field, old_spec, new_spec)
  local level, anchor = read_bar(acct, level_field, anchor_field, old_spec, now)
  level, anchor = bar_rescale(old_spec, new_spec, level, anchor, now)
  write_bar(KEYS[1], level_field, anchor_field, level, anchor, new_spec)
end

if acct.plan == 'subscription' and new.plan == 'subscription' then
  local old_r, old_w = account_specs(acct, cfg)
  local new_r, new_w = account_specs(new, cfg)
  carry('rl', 'ra', old_r, new_r)
  carry('wl', 'wa', old_w, new_w)
end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
return redis.call('HGETALL', KEYS[1])
