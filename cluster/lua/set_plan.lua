-- set_plan.lua: change an account's plan, keeping its bar levels.
--
-- Units: times in ms, request bar in request units, money in picodollars,
-- integers only.
-- KEYS[1] account hash     packserve:{A}:account
-- ARGV[1..6] bar config (store.lua); ARGV[7] now ms or '' (Redis TIME);
-- ARGV[8..] field, value pairs of the new plan (plan packs cap pconc r_req w_usd c_std c_small).
-- Returns {} if the account does not exist, else its HGETALL after the change.
-- Between two subscriptions each bar is settled under the old capacity; a
-- full bar stays full, a level above the new capacity is clamped, and a
-- level below it keeps its running tick interval.

local cfg = load_config()
local acct = load_account(KEYS[1])
if acct == nil then return {} end
local now = clock(ARGV[7])
local new = {}
for i = 8, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end

local function rebase(level_field, anchor_field, old_spec, new_spec)
  local level, anchor = read_bar(acct, level_field, anchor_field, old_spec)
  level, anchor = bar_settle(old_spec, level, anchor, now)
  if anchor ~= nil then level, anchor = bar_settle(new_spec, level, anchor, now) end
  write_bar(KEYS[1], level_field, anchor_field, level, anchor)
end

if acct.plan == 'subscription' and new.plan == 'subscription' then
  local old_r, old_w = account_specs(acct, cfg)
  local new_r, new_w = account_specs(new, cfg)
  rebase('rl', 'ra', old_r, new_r)
  rebase('wl', 'wa', old_w, new_w)
end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
return redis.call('HGETALL', KEYS[1])
