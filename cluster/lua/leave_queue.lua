-- leave_queue.lua: a waiter gives up (timeout, disconnect).
--
-- Units: none (ids only).
-- KEYS[1] queue zset       packserve:{A}:queue:<model>
-- KEYS[2] queue expiry     packserve:{A}:qexp:<model>
-- ARGV[1] waiter_id; ARGV[2] wake-up channel.
-- Returns 1 if the waiter was queued. Those behind it may now be first in
-- line, so they are woken.

local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if removed == 1 then redis.call('PUBLISH', ARGV[2], ARGV[1]) end
return removed
