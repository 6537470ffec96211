-- reserve.lua: the whole admission decision for one request, atomically.
--
-- Units: times in ms, request bar in request units, money in picodollars,
-- integers only.
-- KEYS[1] account hash           packserve:{A}:account
-- KEYS[2] leases zset (model)    packserve:{A}:lease:<model>   lease_id -> expiry ms
-- KEYS[3] queue zset (model)     packserve:{A}:queue:<model>   waiter_id -> FIFO sequence
-- KEYS[4] queue expiry (model)   packserve:{A}:qexp:<model>    waiter_id -> expiry ms
-- KEYS[5] models set             packserve:{A}:models
-- KEYS[6] spend hash             packserve:{A}:spend           month start ms -> picodollars
-- KEYS[7] key bars hash          packserve:{A}:keybars         <key id>:rl|ra|rc|wl|wa|wc
-- KEYS[8] keys hash              packserve:{A}:keys            key id -> JSON key record (its caps)
-- ARGV[1..6] bar config (store.lua); ARGV[7] now ms or '' (Redis TIME);
-- ARGV[8] model; ARGV[9] size class; ARGV[10] weight (request units);
-- ARGV[11] lease_id; ARGV[12] lease ttl ms; ARGV[13] waiter_id or '';
-- ARGV[14] waiter ttl ms; ARGV[15] key id or '' (its caps are checked after the account's bars).
-- Returns {'missing'} or the reply() layout with status
--   'admitted' (a = lease expiry ms), 'refused' (a = reason, b = retry ms or ''),
--   'busy' (a = earliest lease expiry or '', b = queue position or -1).
-- Nothing is charged unless the request is admitted.

local cfg = load_config()
local acct, flat = load_account(KEYS[1])
if acct == nil then return {'missing'} end
local now = clock(ARGV[7])
local model, size, weight = ARGV[8], ARGV[9], tonumber(ARGV[10])
local lease_id, lease_ttl = ARGV[11], tonumber(ARGV[12])
local waiter, waiter_ttl = ARGV[13], tonumber(ARGV[14])

-- Crashed holders and dead waiters stop blocking others.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', fmt(now))) do
  redis.call('ZREM', KEYS[3], dead)
  redis.call('ZREM', KEYS[4], dead)
end

local st = current_state(acct, cfg, KEYS[6], now)

-- A retried call (reply lost on the wire) finds its lease: never charge twice.
local held = redis.call('ZSCORE', KEYS[2], lease_id)
if held then return reply('admitted', now, held, '', st, flat) end

if acct.susp == '1' then return reply('refused', now, ACCOUNT_SUSPENDED, '', st, flat) end

local after = nil
local key_after = nil
local key_id = ARGV[15] or ''
local krspec, kwspec = nil, nil
if acct.plan == 'payg' then
  local refusal = check_spend_cap(st.spend, optional_int(acct.cap), now)
  if refusal then return reply('refused', now, refusal.reason, fmt(refusal.retry_ms), st, flat) end
elseif size ~= 'unmetered' then
  local decision = check_bars(st.rspec, st.rl, st.ra, st.wspec, st.wl, st.wa, weight, now)
  if not decision.ok then
    return reply('refused', now, decision.reason, fmt(decision.retry_ms), st, flat)
  end
  after = decision
  krspec, kwspec = key_specs(KEYS[8], key_id, cfg)
  if krspec or kwspec then
    local krl, kra, kwl, kwa = read_key_bars(KEYS[7], key_id, krspec, kwspec, now)
    local kd = check_key_bars(krspec, krl, kra, kwspec, kwl, kwa, weight, now)
    if not kd.ok then return reply('refused', now, kd.reason, fmt(kd.retry_ms), st, flat) end
    key_after = kd
  end
end

local limit
if acct.plan == 'payg' then
  limit = tonumber(acct.pconc)
elseif size == 'small' then
  limit = tonumber(acct.c_small)
else
  limit = tonumber(acct.c_std)
end
local active = redis.call('ZCARD', KEYS[2])
local rank = false
if waiter ~= '' then rank = redis.call('ZRANK', KEYS[3], waiter) end
local ahead = rank or redis.call('ZCARD', KEYS[3])

if not concurrency_allows(active, limit, ahead) then
  local earliest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or ''
  local position = -1
  if waiter ~= '' then
    if not rank then
      redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[1], 'qseq', 1), waiter)
      redis.call('SADD', KEYS[5], model)
    end
    redis.call('ZADD', KEYS[4], fmt(now + waiter_ttl), waiter)
    position = ahead
  end
  return reply('busy', now, earliest, fmt(position), st, flat)
end

if waiter ~= '' then
  redis.call('ZREM', KEYS[3], waiter)
  redis.call('ZREM', KEYS[4], waiter)
end
local expires = now + lease_ttl
redis.call('ZADD', KEYS[2], fmt(expires), lease_id)
redis.call('SADD', KEYS[5], model)
if after then
  write_bar(KEYS[1], 'rl', 'ra', after.rl, after.ra, st.rspec)
  write_bar(KEYS[1], 'wl', 'wa', after.wl, after.wa, st.wspec)
  st.rl, st.ra, st.wl, st.wa = after.rl, after.ra, after.wl, after.wa
end
if key_after then write_key_bar(KEYS[7], key_id, 'r', key_after.rl, key_after.ra, krspec) end
return reply('admitted', now, fmt(expires), '', st, flat)
