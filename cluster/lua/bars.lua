-- bars.lua: the policy math of policies/bars.py and policies/admission.py, in Lua.
--
-- Prepended to every script when it is loaded (Redis scripts cannot require).
-- Units: times and durations in ms; the request bar in request units
-- (policies.units); money in picodollars. Integers only.
--
-- Redis Lua numbers are doubles. Every quantity here stays below 2^53, so
-- +, -, * and comparisons are exact; division is not, hence idiv() below.
-- Never tostring() a big number (it prints 1e+14): use fmt().
--
-- A bar spec is a table {cap=, amt=, tms=} (capacity, tick amount, tick ms).
-- A bar state is the pair (level, anchor); anchor == nil means "full, no
-- interval running", exactly as BarState.anchor_ms is None in Python.
-- Each function below mirrors its Python namesake line for line.

-- Floor division, exact for integers below 2^53 (a double quotient can be
-- one off near an integer, so correct it).
local function idiv(a, b)
  local q = math.floor(a / b)
  while q * b > a do q = q - 1 end
  while (q + 1) * b <= a do q = q + 1 end
  return q
end

local function ceil_div(a, b)
  return -idiv(-a, b)
end

local function fmt(x)
  if x == nil then return '' end
  return string.format('%.0f', x)
end

-- policies.bars.settle
local function bar_settle(spec, level, anchor, now)
  if level >= spec.cap then
    -- A shrunk capacity clamps; a full bar accrues nothing.
    return spec.cap, nil
  end
  if anchor == nil then anchor = now end
  if now <= anchor then return level, anchor end
  local ticks = idiv(now - anchor, spec.tms)
  if ticks == 0 then return level, anchor end
  level = level + ticks * spec.amt
  if level >= spec.cap then return spec.cap, nil end
  return level, anchor + ticks * spec.tms
end

-- floor(a * b / c) for integers a, b >= 0, c > 0 whose product may pass
-- 2^53: long multiplication over b's bits, keeping a*b = q*c + r with r < c,
-- so no intermediate exceeds the result or 2c. Returns q, r.
local function mul_div(a, b, c)
  local qa = idiv(a, c)
  local ra = a - qa * c
  local bits = {}
  while b > 0 do
    local half = idiv(b, 2)
    bits[#bits + 1] = b - half * 2
    b = half
  end
  local q, r = 0, 0
  for i = #bits, 1, -1 do
    q, r = q * 2, r * 2
    if r >= c then q, r = q + 1, r - c end
    if bits[i] == 1 then
      q, r = q + qa, r + ra
      if r >= c then q, r = q + 1, r - c end
    end
  end
  return q, r
end

-- floor(a * b / c) for any integer a (Python's //), b >= 0, c > 0.
local function mul_div_floor(a, b, c)
  if a >= 0 then return (mul_div(a, b, c)) end
  local q, r = mul_div(-a, b, c)
  if r > 0 then q = q + 1 end
  return -q
end

-- policies.bars.rescale: keep the remaining fraction across a capacity change.
local function bar_rescale(old, new, level, anchor, now)
  local l, a = bar_settle(old, level, anchor, now)
  if a == nil or old.cap <= 0 then return new.cap, nil end
  if old.cap == new.cap then return bar_settle(new, l, a, now) end
  return bar_settle(new, mul_div_floor(l, new.cap, old.cap), a, now)
end

-- policies.bars.debit: settle, then take amount (negative = refund).
local function bar_debit(spec, level, anchor, amount, now)
  local l, a = bar_settle(spec, level, anchor, now)
  l = l - amount
  if l >= spec.cap then return spec.cap, nil end
  if a == nil then a = now end
  return l, a
end

-- policies.bars.next_tick_ms
local function bar_next_tick(spec, level, anchor, now)
  local _, a = bar_settle(spec, level, anchor, now)
  if a == nil then return nil end
  return a + spec.tms
end

-- policies.bars.ms_until_level: 0 if already there, nil if never.
local function bar_ms_until_level(spec, level, anchor, target, now)
  local l, a = bar_settle(spec, level, anchor, now)
  if l >= target then return 0 end
  if target > spec.cap then return nil end
  local ticks = ceil_div(target - l, spec.amt)
  return a + ticks * spec.tms - now
end

-- policies.bars.ms_until_positive
local function bar_ms_until_positive(spec, level, anchor, now)
  if spec.cap >= 1 then
    return bar_ms_until_level(spec, level, anchor, 1, now)
  end
  return nil
end

-- policies.bars.ceil_seconds, then Refuse.retry_after_s (at least 1 s).
local function retry_after_s(ms)
  if ms == nil then return nil end
  return math.max(1, ceil_div(ms, 1000))
end

local REQUEST_BAR_EMPTY = 'request_bar_empty'
local WEEKLY_TOKENS_EXHAUSTED = 'weekly_tokens_exhausted'
local SPEND_CAP_REACHED = 'spend_cap_reached'
local ACCOUNT_SUSPENDED = 'account_suspended'

-- policies.admission.check_bars. Returns a table:
--   {ok=true, rl=, ra=, wl=, wa=}     request bar already debited by the weight
--   {ok=false, reason=, retry_ms=}    retry_ms nil: waiting will not help
local function check_bars(rspec, rl, ra, wspec, wl, wa, weight, now)
  rl, ra = bar_settle(rspec, rl, ra, now)
  wl, wa = bar_settle(wspec, wl, wa, now)
  if rl < weight then
    return {ok = false, reason = REQUEST_BAR_EMPTY,
            retry_ms = bar_ms_until_level(rspec, rl, ra, weight, now)}
  end
  if wl <= 0 then
    return {ok = false, reason = WEEKLY_TOKENS_EXHAUSTED,
            retry_ms = bar_ms_until_positive(wspec, wl, wa, now)}
  end
  if weight == 0 then
    return {ok = true, rl = rl, ra = ra, wl = wl, wa = wa}
  end
  rl, ra = bar_debit(rspec, rl, ra, weight, now)
  return {ok = true, rl = rl, ra = ra, wl = wl, wa = wa}
end

local KEY_REQUEST_CAP_REACHED = 'key_request_cap_reached'
local KEY_WEEKLY_CAP_REACHED = 'key_weekly_cap_reached'

-- policies.admission.check_key_bars: a key's own caps (nil spec = no cap).
-- Returns {ok=true, rl=, ra=, wl=, wa=} (request bar debited) or {ok=false, reason=, retry_ms=}.
local function check_key_bars(rspec, rl, ra, wspec, wl, wa, weight, now)
  if rspec then rl, ra = bar_settle(rspec, rl, ra, now) end
  if wspec then wl, wa = bar_settle(wspec, wl, wa, now) end
  if rspec and rl < weight then
    return {ok = false, reason = KEY_REQUEST_CAP_REACHED,
            retry_ms = bar_ms_until_level(rspec, rl, ra, weight, now)}
  end
  if wspec and wl <= 0 then
    return {ok = false, reason = KEY_WEEKLY_CAP_REACHED,
            retry_ms = bar_ms_until_positive(wspec, wl, wa, now)}
  end
  if rspec and weight ~= 0 then rl, ra = bar_debit(rspec, rl, ra, weight, now) end
  return {ok = true, rl = rl, ra = ra, wl = wl, wa = wa}
end

-- policies.admission.settle_weekly
local function settle_weekly(wspec, level, anchor, cost, now)
  if cost < 0 then
    error('a token cost cannot be negative')
  end
  if cost == 0 then return bar_settle(wspec, level, anchor, now) end
  return bar_debit(wspec, level, anchor, cost, now)
end

-- policies.admission.refund_request: never above capacity (debit clamps).
local function refund_request(rspec, level, anchor, weight, now)
  if weight == 0 then return bar_settle(rspec, level, anchor, now) end
  return bar_debit(rspec, level, anchor, -weight, now)
end

-- Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
-- days_from_civil), so calendar months need no date library.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = idiv(y, 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = idiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + idiv(yoe, 4) - idiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

-- (year, month) of a day count: Hinnant's civil_from_days.
local function civil_month(days)
  local z = days + 719468
  local era = idiv(z, 146097)
  local doe = z - era * 146097
  local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
  local mp = idiv(5 * doy + 2, 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end

-- policies.admission.month_bounds_ms: [start, end) of the UTC month of now.
local function month_bounds(now)
  local day_ms = 86400000
  local y, m = civil_month(idiv(now, day_ms))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * day_ms, days_from_civil(ny, nm, 1) * day_ms
end

-- policies.admission.check_spend_cap: nil (allowed) or {reason=, retry_ms=}.
local function check_spend_cap(spent, cap, now)
  if cap == nil or spent < cap then return nil end
  local _, month_end = month_bounds(now)
  return {ok = false, reason = SPEND_CAP_REACHED, retry_ms = month_end - now}
end

-- policies.admission.concurrency_allows: FIFO, nobody overtakes the queue.
local function concurrency_allows(active, limit, waiters_ahead)
  return active + waiters_ahead < limit
end
