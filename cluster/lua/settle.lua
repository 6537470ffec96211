-- settle.lua: release a lease, charge what was used, record one usage event.
--
-- Units: times in ms, request bar in request units, money in picodollars,
-- integers only.
-- KEYS[1] account hash     packserve:{A}:account
-- KEYS[2] leases zset      packserve:{A}:lease:<model>
-- KEYS[3] settled zset     packserve:{A}:settled   lease_id -> settle time ms
-- KEYS[4] usage stream     packserve:{A}:usage     field e = msgpack UsageEvent
-- KEYS[5] spend hash       packserve:{A}:spend     month start ms -> picodollars
-- KEYS[6] key bars hash    packserve:{A}:keybars   <key id>:rl|ra|rc|wl|wa|wc
-- KEYS[7] keys hash        packserve:{A}:keys      key id -> JSON key record (its caps)
-- ARGV[1..6] bar config (store.lua); ARGV[7] now ms or '' (Redis TIME);
-- ARGV[8] lease_id; ARGV[9] cost picodollars; ARGV[10] refund (request units);
-- ARGV[11] encoded event; ARGV[12] event ts ms; ARGV[13] retention ms;
-- ARGV[14] wake-up channel; ARGV[15] how long settled lease ids are remembered (ms);
-- ARGV[16] key id or '': its capped bars are charged and refunded like the account's.
-- Returns {'missing'} (account deleted: nothing recorded) or the reply()
-- layout with status 'ok' and both bars after settlement.
-- Idempotent per lease_id: a retried settle charges and records nothing twice.

local cfg = load_config()
local now = clock(ARGV[7])
local lease_id, cost, refund = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local event, event_ts, retention = ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13])

redis.call('ZREM', KEYS[2], lease_id)
-- Waiters on this (account, model) re-check at once instead of at lease expiry.
redis.call('PUBLISH', ARGV[14], lease_id)

local acct = load_account(KEYS[1])
if acct == nil then return {'missing'} end

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. fmt(now - tonumber(ARGV[15])))
if redis.call('ZADD', KEYS[3], 'NX', fmt(now), lease_id) == 1 then
  if acct.plan == 'payg' then
    local month_start = month_bounds(now)
    redis.call('HINCRBY', KEYS[5], fmt(month_start), fmt(cost))
  else
    local rspec, wspec = account_specs(acct, cfg)
    local rl, ra = read_bar(acct, 'rl', 'ra', rspec, now)
    local wl, wa = read_bar(acct, 'wl', 'wa', wspec, now)
    wl, wa = settle_weekly(wspec, wl, wa, cost, now)
    rl, ra = refund_request(rspec, rl, ra, refund, now)
    write_bar(KEYS[1], 'rl', 'ra', rl, ra, rspec)
    write_bar(KEYS[1], 'wl', 'wa', wl, wa, wspec)
    local key_id = ARGV[16] or ''
    local krspec, kwspec = key_specs(KEYS[7], key_id, cfg)
    if krspec or kwspec then
      local krl, kra, kwl, kwa = read_key_bars(KEYS[6], key_id, krspec, kwspec, now)
      if kwspec then kwl, kwa = settle_weekly(kwspec, kwl, kwa, cost, now) end
      if krspec then krl, kra = refund_request(krspec, krl, kra, refund, now) end
      write_key_bar(KEYS[6], key_id, 'r', krl, kra, krspec)
      write_key_bar(KEYS[6], key_id, 'w', kwl, kwa, kwspec)
    end
  end

  -- Stream ids must grow; injected (test) times and late settlements may
  -- not, so take the newest of now, the event time and the stream's last id.
  -- An id never below the event time lets usage() range-scan from `since`.
  local id_ms = math.max(now, event_ts)
  if redis.call('EXISTS', KEYS[4]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[4])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        id_ms = math.max(id_ms, tonumber(string.match(info[i + 1], '^(%d+)')))
      end
    end
  end
  redis.call('XADD', KEYS[4], fmt(id_ms) .. '-*', 'e', event)
  redis.call('XTRIM', KEYS[4], 'MINID', fmt(now - retention))
end

local acct_after, flat = load_account(KEYS[1])
return reply('ok', now, '', '', current_state(acct_after, cfg, KEYS[5], now), flat)
