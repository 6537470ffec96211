-- vector_harness.lua: runs compiled policy vectors (policies/vectors.py
-- compile_vector) through bars.lua, for tests only; never writes a key.
--
-- Units: times in ms, request bar in request units, money in picodollars,
-- integers only.
-- KEYS: none.
-- ARGV[1] JSON {request: {capacity, tick_amount, tick_ms}, weekly: {...},
--               unit, pico_per_dollar, steps: [compiled steps]}
-- Returns a JSON array with one observation per step, shaped exactly like
-- policies.vectors.run_python's (numbers as integers, missing as null,
-- fractions as str(fractions.Fraction)).

local input = cjson.decode(ARGV[1])
local NULL = cjson.null

local function spec_of(t)
  return {cap = t.capacity, amt = t.tick_amount, tms = t.tick_ms}
end

local function from_json(v)
  if v == NULL then return nil end
  return v
end

local function to_json(v)
  if v == nil then return NULL end
  return v
end

local function gcd(a, b)
  a, b = math.abs(a), math.abs(b)
  while b ~= 0 do a, b = b, math.fmod(a, b) end
  return a
end

-- str(Fraction(n, d)); dividing by an exact divisor is exact in doubles.
local function fraction(n, d)
  local g = gcd(n, d)
  n, d = n / g, d / g
  if d < 0 then n, d = -n, -d end
  if d == 1 then return fmt(n) end
  return fmt(n) .. '/' .. fmt(d)
end

-- cjson prints numbers with 14 significant digits, so objects are encoded by hand.
local function encode_object(fields)
  local parts = {}
  for _, kv in ipairs(fields) do
    local v = kv[2]
    local text
    if v == NULL then
      text = 'null'
    elseif type(v) == 'number' then
      text = fmt(v)
    else
      text = cjson.encode(v)
    end
    parts[#parts + 1] = cjson.encode(kv[1]) .. ':' .. text
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

local rspec, wspec = spec_of(input.request), spec_of(input.weekly)
local unit, pico = input.unit, input.pico_per_dollar
local rl, ra = rspec.cap, nil
local wl, wa = wspec.cap, nil
-- An API key's own capped bars (op key_caps); nil spec = no cap.
local krspec, kwspec = nil, nil
local krl, kra, kwl, kwa = nil, nil, nil, nil

local function observe_state(now)
  local r_l, r_a = bar_settle(rspec, rl, ra, now)
  local w_l, w_a = bar_settle(wspec, wl, wa, now)
  local obs = {
    {'request_level', r_l}, {'request_anchor_ms', to_json(r_a)},
    {'weekly_level', w_l}, {'weekly_anchor_ms', to_json(w_a)},
    {'request_next_tick_ms', to_json(bar_next_tick(rspec, r_l, r_a, now))},
    {'weekly_next_tick_ms', to_json(bar_next_tick(wspec, w_l, w_a, now))},
    {'requests_remaining', fraction(r_l, unit)},
    {'weekly_dollars', fraction(w_l, pico)},
  }
  if krspec then obs[#obs + 1] = {'key_request_level', (bar_settle(krspec, krl, kra, now))} end
  if kwspec then obs[#obs + 1] = {'key_weekly_level', (bar_settle(kwspec, kwl, kwa, now))} end
  return obs
end

local function run_reserve(step)
  local admitted, refusal = 0, nil
  for _ = 1, step['repeat'] do
    local d = check_bars(rspec, rl, ra, wspec, wl, wa, step.weight_units, step.at_ms)
    if d.ok and (krspec or kwspec) then
      local kd = check_key_bars(krspec, krl, kra, kwspec, kwl, kwa, step.weight_units, step.at_ms)
      if kd.ok then
        krl, kra, kwl, kwa = kd.rl, kd.ra, kd.wl, kd.wa
      else
        d = kd
      end
    end
    if d.ok then
      rl, ra, wl, wa = d.rl, d.ra, d.wl, d.wa
      admitted = admitted + 1
    else
      refusal = d
    end
  end
  local obs = {{'admitted', admitted}}
  if refusal then
    obs[#obs + 1] = {'reason', refusal.reason}
    obs[#obs + 1] = {'retry_after_s', to_json(retry_after_s(refusal.retry_ms))}
  end
  return obs
end

local out = {}
for _, step in ipairs(input.steps) do
  local now = step.at_ms
  local obs = {}
  if step.op == 'reserve' then
    obs = run_reserve(step)
  elseif step.op == 'settle' then
    wl, wa = settle_weekly(wspec, wl, wa, step.cost_pico, now)
    if step.refund_units ~= 0 then rl, ra = refund_request(rspec, rl, ra, step.refund_units, now) end
    if kwspec then kwl, kwa = settle_weekly(kwspec, kwl, kwa, step.cost_pico, now) end
    if krspec and step.refund_units ~= 0 then krl, kra = refund_request(krspec, krl, kra, step.refund_units, now) end
  elseif step.op == 'key_caps' then
    krspec, kwspec = nil, nil
    krl, kra, kwl, kwa = nil, nil, nil, nil
    if step.request ~= NULL then krspec = spec_of(step.request); krl = krspec.cap end
    if step.weekly ~= NULL then kwspec = spec_of(step.weekly); kwl = kwspec.cap end
  elseif step.op == 'set' then
    if step.request_level ~= nil then rl = from_json(step.request_level) end
    if step.request_anchor_ms ~= nil then ra = from_json(step.request_anchor_ms) end
    if step.weekly_level ~= nil then wl = from_json(step.weekly_level) end
    if step.weekly_anchor_ms ~= nil then wa = from_json(step.weekly_anchor_ms) end
  elseif step.op == 'replan' then
    local new_r, new_w = spec_of(step.request), spec_of(step.weekly)
    rl, ra = bar_rescale(rspec, new_r, rl, ra, now)
    wl, wa = bar_rescale(wspec, new_w, wl, wa, now)
    rspec, wspec = new_r, new_w
  elseif step.op == 'state' then
    obs = observe_state(now)
  else
    error('unknown vector op ' .. tostring(step.op))
  end
  out[#out + 1] = encode_object(obs)
end
return '[' .. table.concat(out, ',') .. ']'
