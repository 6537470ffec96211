-- snapshot.lua: both bars settled to now (nothing written) and the month spend.
--
-- Units: times in ms, request bar in request units, money in picodollars,
-- integers only.
-- KEYS[1] account hash     packserve:{A}:account
-- KEYS[2] spend hash       packserve:{A}:spend
-- ARGV[1..6] bar config (store.lua); ARGV[7] now ms or '' (Redis TIME).
-- Returns {'missing'} or the reply() layout with status 'ok'.

local cfg = load_config()
local acct, flat = load_account(KEYS[1])
if acct == nil then return {'missing'} end
local now = clock(ARGV[7])
return reply('ok', now, '', '', current_state(acct, cfg, KEYS[2], now), flat)
