-- set_suspended.lua: suspend or resume an account.
--
-- Units: none.
-- KEYS[1] account hash     packserve:{A}:account
-- ARGV[1] '1' suspended, '0' active.
-- Returns {} if the account does not exist, else its HGETALL after the change.

if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('HSET', KEYS[1], 'susp', ARGV[1])
return redis.call('HGETALL', KEYS[1])
