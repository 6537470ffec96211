-- fairness.lua: the VTC ordering rules of policies/fairness.py, in Lua.
--
-- Prepended (after bars.lua, for fmt) to the capacity scripts. Units:
-- counters in counter units (weighted tokens x WEIGHT_SCALE / weight, exact
-- integers below 2^53), arrival sequences are integers. Each function mirrors
-- its Python namesake; tests/test_fairness.py runs one table against both.

-- policies.fairness.lift: `active` is a list of counters, `last` a counter or nil.
local function lift(counter, active, last)
  if #active > 0 then
    local low = active[1]
    for i = 2, #active do
      if active[i] < low then low = active[i] end
    end
    if low > counter then return low end
    return counter
  end
  if last ~= nil and last > counter then return last end
  return counter
end

-- policies.fairness.pick: `waiting` is a list of {seq=, account=, ...};
-- `counters` maps account -> counter (absent = 0); mode 'fair' or 'fifo';
-- `active` maps account -> requests waiting or running (absent = 0).
-- Returns the chosen element or nil.
local function pick(waiting, counters, mode, active)
  local best, bc, bh, bs, ba = nil, nil, nil, nil, nil
  for _, w in ipairs(waiting) do
    local c, h = 0, 0
    if mode == 'fair' then
      c = counters[w.account] or 0
      h = active[w.account] or 0
    end
    local better = best == nil or c < bc or (c == bc and (h < bh or (h == bh and
      (w.seq < bs or (w.seq == bs and w.account < ba)))))
    if better then best, bc, bh, bs, ba = w, c, h, w.seq, w.account end
  end
  return best
end

-- policies.fairness.preemption_victim: `counters`, `active` and `running`
-- map account -> counter, requests waiting or running, sequences running
-- (absent = 0); `paused` is the account whose paused sequence would take
-- the freed sequence, or nil. Returns the victim account or nil.
local MIN_VICTIM_RUNNING = 2
local function preemption_victim(waiter, counters, active, running, paused)
  local wc, wh = counters[waiter] or 0, active[waiter] or 0
  if paused ~= nil then
    local pc, ph = counters[paused] or 0, active[paused] or 0
    local first = paused ~= waiter and (wc < pc or (wc == pc and wh < ph))
    if first and (running[paused] or 0) >= MIN_VICTIM_RUNNING then return paused end
    return nil
  end
  if (running[waiter] or 0) > 0 then return nil end
  local best, bc, bh = nil, nil, nil
  for account, n in pairs(running) do
    if account ~= waiter and n >= MIN_VICTIM_RUNNING then
      local c, h = counters[account] or 0, active[account] or 0
      local after = c > wc or (c == wc and h > wh)
      local better = best == nil or c > bc or (c == bc and (h > bh or (h == bh and account > best)))
      if after and better then best, bc, bh = account, c, h end
    end
  end
  return best
end
