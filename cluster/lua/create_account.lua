-- create_account.lua: write a new account hash and index it.
--
-- Units: created time in ms, spend cap in picodollars, integers only.
-- KEYS[1] account hash     packserve:{A}:account
-- KEYS[2] account index    packserve:accounts     zset account id -> created ms
-- ARGV[1] account id; ARGV[2] created ms; ARGV[3..] field, value pairs.
-- Returns 1, or 0 if the account already exists (nothing written).

if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
