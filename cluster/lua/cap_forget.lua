-- cap_forget.lua: drop a deleted account's virtual token counter on one model.
--
-- Units: none.
-- KEYS[1..9]: see capacity.lua. ARGV[1] the account id.
-- An account with entries still waiting or running keeps its counter until
-- they leave (the capacity scripts still charge and order them). Returns 1 if
-- a counter was dropped, else 0.

local account = ARGV[1]
if redis.call('HGET', KEYS[5], account) then return 0 end
return redis.call('HDEL', KEYS[6], account)
