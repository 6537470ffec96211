-- auth_failures.lua: count one failed authentication from a source address; refuse past the limit.
--
-- The Lua twin of policies/auth_failures.py::record_failure (fixed windows).
-- Units: times in ms, integers only.
-- KEYS[1] hash  packserve:authfail:<source>   w -> window number, n -> failures in it
-- ARGV[1] now ms or '' (Redis TIME); ARGV[2] limit (failures allowed per window); ARGV[3] window ms.
-- Returns {failures in this window, 1 if refused else 0, ms until the window ends}.
-- The key expires two windows after the last failure, so idle sources cost nothing.

local now = clock(ARGV[1])
local limit = tonumber(ARGV[2])
local window_ms = tonumber(ARGV[3])
local window = math.floor(now / window_ms)
local prev = redis.call('HMGET', KEYS[1], 'w', 'n')
local count = 1
if prev[1] and tonumber(prev[1]) == window then count = tonumber(prev[2]) + 1 end
redis.call('HSET', KEYS[1], 'w', fmt(window), 'n', fmt(count))
redis.call('PEXPIRE', KEYS[1], fmt(2 * window_ms))
local refused = 0
if count > limit then refused = 1 end
return {count, refused, (window + 1) * window_ms - now}
