-- capacity.lua: helpers shared by the capacity scripts (cap_*.lua); prepended
-- after bars.lua, store.lua (clock) and fairness.lua.
--
-- One model's capacity, shared by every gateway. Units: times in ms,
-- counters in counter units (policies.fairness), integers only.
-- KEYS (every capacity script, in this order; {M} is the model, a Redis
-- Cluster hash tag, so one model's keys share a slot):
--   KEYS[1] run    zset  packserve:cap:{M}:run    entry_id -> lease expiry ms (dispatched)
--   KEYS[2] owner  hash  packserve:cap:{M}:owner  entry_id -> account id (waiting or running)
--   KEYS[3] wait   zset  packserve:cap:{M}:wait   entry_id -> arrival sequence
--   KEYS[4] wexp   zset  packserve:cap:{M}:wexp   entry_id -> expiry ms (a dead waiter stops waiting)
--   KEYS[5] act    hash  packserve:cap:{M}:act    account -> entries waiting or running (active accounts)
--   KEYS[6] vtc    hash  packserve:cap:{M}:vtc    account -> virtual token counter
--   KEYS[7] meta   hash  packserve:cap:{M}:meta   seq (arrival counter), last (counter of the
--                                                 account that went idle last), cap (last capacity),
--                                                 paused (account whose sequence is paused, while
--                                                 the model is one over its capacity)
--   KEYS[8] paid   hash  packserve:cap:{M}:paid   entry_id -> counter units already added
--   KEYS[9] pre    hash  packserve:cap:{M}:pre    entry_id -> account whose sequence the engine pauses
--                                                 for it (dispatched over a full model)
-- ARGV (every capacity script): [1] now ms or '' (Redis TIME); [2] capacity
-- (sequences at once, as the calling gateway sees the model); [3] mode
-- 'fair' | 'fifo'; [4] lease ttl ms; [5] wake-up channel prefix (the entry id
-- is appended: one channel per waiting request); [6] '1' to preempt (the
-- caller sends it in fair mode only: CapacityTerms.preempts), else '0'.
-- Script arguments follow.

local function cap_args()
  return {now = clock(ARGV[1]), capacity = tonumber(ARGV[2]), mode = ARGV[3], ttl = tonumber(ARGV[4]),
          wake = ARGV[5], preempt = ARGV[6] == '1'}
end

local function counter_of(account)
  return tonumber(redis.call('HGET', KEYS[6], account) or '0')
end

-- Looks up an account's counter and active count once into the tables the ordering rules read.
local function note(account, counters, active)
  if counters[account] == nil then
    counters[account] = counter_of(account)
    active[account] = tonumber(redis.call('HGET', KEYS[5], account) or '0')
  end
end

-- An account becomes active with its first entry: lifted (policies.fairness.lift).
local function activate(account)
  if not redis.call('HGET', KEYS[5], account) then
    local active = {}
    for _, other in ipairs(redis.call('HKEYS', KEYS[5])) do active[#active + 1] = counter_of(other) end
    local stored = redis.call('HGET', KEYS[7], 'last')
    local last = nil  -- HGET answers false, not nil, for a missing field
    if stored then last = tonumber(stored) end
    redis.call('HSET', KEYS[6], account, fmt(lift(counter_of(account), active, last)))
  end
  redis.call('HINCRBY', KEYS[5], account, 1)
end

-- Add what an entry's service has reached (a running total, so a retried call adds nothing twice).
local function charge(entry, account, total)
  local paid = tonumber(redis.call('HGET', KEYS[8], entry) or '0')
  if total > paid then
    redis.call('HSET', KEYS[6], account, fmt(counter_of(account) + total - paid))
    redis.call('HSET', KEYS[8], entry, fmt(total))
  end
end

-- An entry leaves the model (finished, gave up, expired); its account may go idle.
local function forget(entry)
  local account = redis.call('HGET', KEYS[2], entry)
  redis.call('HDEL', KEYS[2], entry)
  redis.call('HDEL', KEYS[8], entry)
  redis.call('HDEL', KEYS[9], entry)
  if account then
    if redis.call('HINCRBY', KEYS[5], account, -1) <= 0 then
      redis.call('HDEL', KEYS[5], account)
      redis.call('HSET', KEYS[7], 'last', fmt(counter_of(account)))
    end
  end
end

-- Leases of dead gateways and waiters nobody polls any more give their place back.
local function expire(now)
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now))) do
    redis.call('ZREM', KEYS[1], dead)
    forget(dead)
  end
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', fmt(now))) do
    redis.call('ZREM', KEYS[3], dead)
    redis.call('ZREM', KEYS[4], dead)
    forget(dead)
  end
end

-- Entries per account in a zset of entries (KEYS[1]: sequences running; KEYS[3]: requests waiting).
local function per_account(key)
  local count = {}
  for _, entry in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local account = redis.call('HGET', KEYS[2], entry) or ''
    count[account] = (count[account] or 0) + 1
  end
  return count
end

-- Work-conserving: dispatch waiting entries while the model has a free sequence; with preemption,
-- one more over a full model when policies.fairness.preemption_victim names an account to pause.
-- `caller` (or nil) is the calling request's own entry: it learns of its grant from the reply, so
-- nobody is woken for it.
local function fill(a, caller)
  redis.call('HSET', KEYS[7], 'cap', fmt(a.capacity))
  -- Once the model is back at its capacity, the paused sequence takes the freed one unless a waiter
  -- stands before it in fair order (then that waiter goes over capacity instead, and the pause goes on).
  local paused = nil
  local in_flight = redis.call('ZCARD', KEYS[1])
  if in_flight <= a.capacity then
    local stored = redis.call('HGET', KEYS[7], 'paused')
    if stored then
      redis.call('HDEL', KEYS[7], 'paused')
      if in_flight == a.capacity then paused = stored end
    end
  end
  while true do
    in_flight = redis.call('ZCARD', KEYS[1])
    if in_flight > a.capacity or (in_flight == a.capacity and not a.preempt) then return end
    local flat = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
    if #flat == 0 then return end
    local waiting, counters, active = {}, {}, {}
    for i = 1, #flat, 2 do
      local account = redis.call('HGET', KEYS[2], flat[i]) or ''
      waiting[#waiting + 1] = {entry = flat[i], seq = tonumber(flat[i + 1]), account = account}
      note(account, counters, active)
    end
    local w = pick(waiting, counters, a.mode, active)
    if in_flight == a.capacity then
      local running = per_account(KEYS[1])
      for account in pairs(running) do note(account, counters, active) end
      if paused ~= nil then note(paused, counters, active) end
      local victim = preemption_victim(w.account, counters, active, running, paused)
      if victim == nil then return end
      redis.call('HSET', KEYS[9], w.entry, victim)
      redis.call('HSET', KEYS[7], 'paused', victim)
    end
    redis.call('ZREM', KEYS[3], w.entry)
    redis.call('ZREM', KEYS[4], w.entry)
    redis.call('ZADD', KEYS[1], fmt(a.now + a.ttl), w.entry)
    if w.entry ~= caller then redis.call('PUBLISH', a.wake .. w.entry, '1') end
  end
end

local function earliest_expiry()
  return redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or ''
end
