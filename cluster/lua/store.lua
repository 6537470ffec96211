-- store.lua: helpers shared by the store scripts; prepended after bars.lua.
--
-- Units: times in ms, request bar in request units, money in picodollars,
-- integers only (formatted with fmt(), never tostring()).
--
-- Bar-config convention: scripts that touch bars take ARGV[1..6] =
--   request_unit, request tick percent, request tick ms,
--   weekly tick percent, weekly tick ms, picodollars per dollar
-- (all from policies.plans / policies.units, so Lua holds no plan constants).
-- An empty "now" argument means "use Redis TIME" so gateways with skewed
-- clocks agree; tests pass an explicit time.
--
-- The schedule is data: the operator's plans (policies.plans.PlanCatalog,
-- from the config) reach every script through these arguments; the pack sums
-- are in the account hash, refreshed from the plans when a gateway opens the
-- store (redis_store.sync_plans).
--
-- Account hash fields (see redis_store.py): id name plan packs cap pconc susp
-- created r_req w_usd c_std c_small, bars rl ra wl wa (absent level = full
-- bar), rc wc (the capacity each level was recorded against; absent = the
-- current one), qseq (FIFO sequence).

local CONFIG_ARGS = 6

local function load_config()
  return {
    unit = tonumber(ARGV[1]), rpct = tonumber(ARGV[2]), rms = tonumber(ARGV[3]),
    wpct = tonumber(ARGV[4]), wms = tonumber(ARGV[5]), pico = tonumber(ARGV[6]),
  }
end

local function optional_anchor(value)
  if value == nil or value == '' then return nil end
  return tonumber(value)
end

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Returns the account as a table plus the raw HGETALL list (sent back to
-- Python so the caller gets the Account in the same round trip), or nil.
local function load_account(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil, flat end
  local acct = {}
  for i = 1, #flat, 2 do acct[flat[i]] = flat[i + 1] end
  return acct, flat
end

-- SubscriptionLimits.request_bar / weekly_bar from the stored pack sums.
local function account_specs(acct, cfg)
  local rcap = tonumber(acct.r_req) * cfg.unit
  local wcap = tonumber(acct.w_usd) * cfg.pico
  return {cap = rcap, amt = idiv(rcap * cfg.rpct, 100), tms = cfg.rms, pct = cfg.rpct},
         {cap = wcap, amt = idiv(wcap * cfg.wpct, 100), tms = cfg.wms, pct = cfg.wpct}
end

-- The field holding the capacity a level was recorded against.
local CAP_FIELD = {rl = 'rc', wl = 'wc'}

-- An absent level is a full bar, so a full bar stays full whatever its
-- capacity becomes. A level recorded against another capacity (an edited
-- plan, a new reference price) keeps its remaining fraction (bar_rescale),
-- settled to now. Without `now` the level is returned unsettled.
local function read_bar(acct, level_field, anchor_field, spec, now)
  local level = acct[level_field]
  if level == nil or level == '' then return spec.cap, nil end
  level = tonumber(level)
  local anchor = optional_anchor(acct[anchor_field])
  local recorded = acct[CAP_FIELD[level_field]]
  if recorded == nil or recorded == '' or tonumber(recorded) == spec.cap then return level, anchor end
  recorded = tonumber(recorded)
  local old = {cap = recorded, amt = idiv(recorded * spec.pct, 100), tms = spec.tms}
  return bar_rescale(old, spec, level, anchor, now or clock(''))
end

-- `spec` is the bar's current spec, whose capacity is recorded with the level.
local function write_bar(key, level_field, anchor_field, level, anchor, spec)
  local cap_field = CAP_FIELD[level_field]
  if anchor == nil then
    redis.call('HDEL', key, level_field, anchor_field, cap_field)
  elseif spec == nil then
    redis.call('HSET', key, level_field, fmt(level), anchor_field, fmt(anchor))
    redis.call('HDEL', key, cap_field)
  else
    redis.call('HSET', key, level_field, fmt(level), anchor_field, fmt(anchor), cap_field, fmt(spec.cap))
  end
end

local function month_spend(spend_key, now)
  local start = month_bounds(now)
  return tonumber(redis.call('HGET', spend_key, fmt(start)) or '0')
end

local function optional_int(value)
  if value == nil or value == '' then return nil end
  return tonumber(value)
end

-- A key's own caps (cluster/key_limits.py): its JSON record's max_req
-- (whole requests) and max_wk (picodollars) become bars on the plan's
-- schedules; nil where the key has no cap, or for no key at all.
local function key_specs(keys_hash, key_id, cfg)
  if key_id == nil or key_id == '' then return nil, nil end
  local record = redis.call('HGET', keys_hash, key_id)
  if not record then return nil, nil end
  local r = cjson.decode(record)
  local rspec, wspec = nil, nil
  if type(r.max_req) == 'number' then
    local cap = r.max_req * cfg.unit
    rspec = {cap = cap, amt = idiv(cap * cfg.rpct, 100), tms = cfg.rms, pct = cfg.rpct}
  end
  if type(r.max_wk) == 'number' then
    local cap = r.max_wk
    wspec = {cap = cap, amt = idiv(cap * cfg.wpct, 100), tms = cfg.wms, pct = cfg.wpct}
  end
  return rspec, wspec
end

-- A key's bars live in the account's keybars hash as <key id>:rl, :ra, :rc, :wl, :wa, :wc.
local function read_key_bars(keybars, key_id, rspec, wspec, now)
  local flat = redis.call('HMGET', keybars, key_id .. ':rl', key_id .. ':ra', key_id .. ':rc',
                          key_id .. ':wl', key_id .. ':wa', key_id .. ':wc')
  local view = {rl = flat[1] or nil, ra = flat[2] or nil, rc = flat[3] or nil,
                wl = flat[4] or nil, wa = flat[5] or nil, wc = flat[6] or nil}
  local rl, ra, wl, wa
  if rspec then rl, ra = read_bar(view, 'rl', 'ra', rspec, now) end
  if wspec then wl, wa = read_bar(view, 'wl', 'wa', wspec, now) end
  return rl, ra, wl, wa
end

local function write_key_bar(keybars, key_id, prefix, level, anchor, spec)
  if spec == nil then return end
  if anchor == nil then
    redis.call('HDEL', keybars, key_id .. ':' .. prefix .. 'l', key_id .. ':' .. prefix .. 'a',
               key_id .. ':' .. prefix .. 'c')
  else
    redis.call('HSET', keybars, key_id .. ':' .. prefix .. 'l', fmt(level), key_id .. ':' .. prefix .. 'a',
               fmt(anchor), key_id .. ':' .. prefix .. 'c', fmt(spec.cap))
  end
end

-- Both bars settled to now (not written) and the payg month spend.
local function current_state(acct, cfg, spend_key, now)
  local st = {spend = 0}
  if acct.plan == 'subscription' then
    st.rspec, st.wspec = account_specs(acct, cfg)
    local rl, ra = read_bar(acct, 'rl', 'ra', st.rspec, now)
    local wl, wa = read_bar(acct, 'wl', 'wa', st.wspec, now)
    st.rl, st.ra = bar_settle(st.rspec, rl, ra, now)
    st.wl, st.wa = bar_settle(st.wspec, wl, wa, now)
  else
    st.spend = month_spend(spend_key, now)
  end
  return st
end

-- Reply layout shared with redis_store.py (_parse_snapshot):
--   [1] status [2] now [3] a [4] b [5] rl [6] ra [7] wl [8] wa [9] spend [10..] account HGETALL
local function reply(status, now, a, b, st, flat)
  local out = {status, fmt(now), a or '', b or '', fmt(st.rl), fmt(st.ra), fmt(st.wl), fmt(st.wa), fmt(st.spend)}
  for i = 1, #flat do out[#out + 1] = flat[i] end
  return out
end
