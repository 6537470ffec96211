// The packserve console: a customer page (an API key) and an operator page (the admin token). Every number
// comes from the public /v2 and /admin/v1 APIs (docs/console.md says which field feeds which figure).
import { stackedBars } from "./charts.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// Auto-refresh period in ms (?refresh=0 turns it off); countdowns tick every second regardless.
const REFRESH_MS = params.has("refresh") ? Number(params.get("refresh")) : 15000;
const PAGE_SIZE = Number(params.get("page_size") || 25);

const REASONS = {
  request_bar_empty: "5-hour request bar empty",
  weekly_tokens_exhausted: "Weekly dollars used up",
  concurrency_limit: "Too many requests at once",
  spend_cap_reached: "Monthly spend cap reached",
  account_suspended: "Account suspended",
  key_request_cap_reached: "Key's request cap reached",
  key_weekly_cap_reached: "Key's weekly cap reached",
  key_disabled: "Key disabled",
  key_expired: "Key expired",
  model_not_allowed: "Model not allowed for this key",
  overloaded: "Model at capacity",
};
const reasonLabel = (r) => REASONS[r] || r.replaceAll("_", " ");

// ---------------------------------------------------------------- formatting

const PICO = 1e12;
export function usd(pico) {
  const d = Number(pico) / PICO;
  if (d === 0) return "$0.00";
  if (Math.abs(d) < 0.000001) return "<$0.000001";
  // Enough decimals that a coding agent's cent fractions show: $0.0028, $0.000012, $14.27.
  return "$" + d.toFixed(Math.abs(d) < 0.0001 ? 6 : Math.abs(d) < 10 ? 4 : 2);
}
const int = (n) => Math.floor(Number(n)).toLocaleString("en-US");
// Floored, so a bar that is not full never reads 100%; one decimal near the ends, where whole percents
// would read 100% or 0% for a bar that is neither.
function percent(p) {
  const whole = Math.floor(p);
  return whole >= 99 || whole < 1 ? `${(Math.floor(p * 10) / 10).toFixed(p >= 100 || p <= 0 ? 0 : 1)}%` : `${whole}%`;
}
const pct = (part, whole) => (whole > 0 ? percent((100 * part) / whole) : "–");
const dollars = (s) => Number(String(s).replace(/[$,]/g, ""));
const ms = (v) => (v === null || v === undefined ? "–" : v >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${v} ms`);

export function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, "0");
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  return `${m}m ${sec}s`;
}

function when(ms) {
  const d = new Date(ms);
  const ago = (Date.now() - ms) / 1000;
  return ago < 86400 ? `${d.toLocaleTimeString("en-GB")} (${duration(ago)} ago)` : d.toISOString().slice(0, 16);
}

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

// A bar: the fill's width is set through the CSSOM (allowed under a strict CSP; a style attribute is not).
// A bar of what is left warns as it empties; a bar of what is in use (`inUse`) as it fills.
function meter(fraction, mini = false, label = "", inUse = false) {
  const f = Math.max(0, Math.min(1, Number(fraction) || 0));
  const tone = inUse ? (f > 0.9 ? " low" : f > 0.7 ? " mid" : "") : (f < 0.1 ? " low" : f < 0.3 ? " mid" : "");
  const fill = h("div", {class: `fill${tone}`});
  fill.style.width = `${(f * 100).toFixed(2)}%`;
  return h("div", {class: `track${mini ? " mini" : ""}`, role: "meter", "aria-valuemin": 0, "aria-valuemax": 100,
                   "aria-valuenow": Math.round(f * 100), "aria-label": label}, fill);
}

// A live countdown: re-rendered every second by tickCountdowns(); once due it asks for fresh data.
function countdown(iso, onDue) {
  const span = h("span", {class: "countdown", "data-at": iso});
  span.onDue = onDue;
  renderCountdown(span);
  return span;
}
// Each due time refreshes once: a browser clock ahead of the server's would otherwise refresh in a loop.
const refreshedFor = new Set();
function renderCountdown(span) {
  const left = (Date.parse(span.dataset.at) - Date.now()) / 1000;
  if (left > 0) { span.textContent = `in ${duration(left)}`; return; }
  span.textContent = "due now";
  if (span.onDue && !refreshedFor.has(span.dataset.at)) {
    refreshedFor.add(span.dataset.at);
    setTimeout(span.onDue, 1500);  // the store applies the tick when next read; give it a moment
  }
}
setInterval(() => document.querySelectorAll(".countdown").forEach(renderCountdown), 1000);

async function api(path, secret, options = {}) {
  const r = await fetch(path, {...options, headers: {authorization: `Bearer ${secret}`,
    ...(options.body ? {"content-type": "application/json"} : {}), ...(options.headers || {})}});
  if (r.status === 204) return null;
  let body = null;
  try { body = await r.json(); } catch { body = null; }
  if (!r.ok) {
    const err = (body && body.error) || {};
    throw new Error(err.message || `${r.status} ${r.statusText}`);
  }
  return body;
}

// Each cell carries its column's heading, shown beside it where a narrow screen stacks the table.
function labelCells(table) {
  const heads = [...table.tHead.rows[0].cells].map((c) => c.textContent.trim());
  for (const row of table.tBodies[0].rows) {
    [...row.cells].forEach((cell, i) => {
      if (cell.colSpan > 1) return;
      cell.dataset.label = heads[i] || "";
      // One box beside the label, however many parts the cell has.
      if (cell.childNodes.length > 1) cell.replaceChildren(h("div", {}, ...cell.childNodes));
    });
  }
}

function showError(id, message) {
  $(id).textContent = message || "";
  $(id).hidden = !message;
}

// ---------------------------------------------------------------- theme and tabs

function effectiveTheme() {
  const chosen = document.documentElement.dataset.theme;
  if (chosen) return chosen;
  return matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}
function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  $("theme").textContent = effectiveTheme() === "dark" ? "Light" : "Dark";
}
$("theme").addEventListener("click", () => {
  const next = effectiveTheme() === "dark" ? "light" : "dark";
  localStorage.setItem("packserve-theme", next);
  applyTheme(next);
});
applyTheme(params.get("theme") || localStorage.getItem("packserve-theme"));
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => applyTheme(null));

const TABS = ["customer", "operator"];
function show(which, focus = false) {
  for (const t of TABS) {
    const tab = $(`tab-${t}`);
    tab.setAttribute("aria-selected", String(t === which));
    tab.tabIndex = t === which ? 0 : -1;
    $(t).hidden = t !== which;
  }
  if (focus) $(`tab-${which}`).focus();
  history.replaceState(null, "", `${location.search}#${which}`);
}
for (const t of TABS) {
  const tab = $(`tab-${t}`);
  tab.addEventListener("click", () => show(t));
  tab.addEventListener("keydown", (e) => {
    const i = TABS.indexOf(t);
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      e.preventDefault();
      show(TABS[(i + (e.key === "ArrowRight" ? 1 : TABS.length - 1)) % TABS.length], true);
    }
  });
}

// ---------------------------------------------------------------- customer page

const customer = {key: "", generation: 0, measure: "requests", usage: null, timer: 0};

function clearCustomer() {
  $("c-data").hidden = true;
  for (const id of ["c-bars", "c-chart", "c-account"]) $(id).replaceChildren();
  for (const id of ["c-models", "c-keys", "c-refusals"]) {
    for (const part of $(id).querySelectorAll("tbody, tfoot")) part.replaceChildren();
  }
  customer.usage = null;
}

function barCard(title, big, sub, fraction, tickText, iso, onDue) {
  const tick = h("div", {class: "tick"});
  if (iso) tick.append(tickText, " ", countdown(iso, onDue));
  else tick.append("Full: nothing to give back");
  return h("div", {class: "card"}, h("h2", {text: title}), h("div", {class: "big", text: big}),
           h("div", {class: "muted small", text: sub}), meter(fraction, false, title), tick);
}

function renderQuota(q) {
  const due = () => loadCustomer(false);
  if (q.payg) {
    const cap = q.payg.spendCap;
    const frac = cap ? 1 - dollars(q.payg.spentThisMonth) / dollars(cap) : 1;
    $("c-bars").replaceChildren(barCard("Pay as you go this month", q.payg.spentThisMonth,
      cap ? `spent of a ${cap} cap` : "spent (no cap)", frac, "Resets", q.payg.resetsAt, due));
    return;
  }
  const r = q.rollingFiveHourLimit, w = q.weeklyTokenLimit;
  const left = Math.floor(r.remaining);
  const tickRequests = Math.floor((r.max * r.tickPercent) / 100);
  $("c-bars").replaceChildren(
    barCard("5-hour requests", `${int(left)} left`, `of ${int(r.max)} · ${pct(left, r.max)} left`,
            r.remaining / r.max, `Next +${r.tickPercent}% (${int(tickRequests)} requests)`, r.nextTickAt, due),
    barCard("Weekly dollars", `${w.remainingCredits} left`, `of ${w.maxCredits} · ${percent(w.percentRemaining)} left`,
            w.percentRemaining / 100, `Next +${w.nextRegenCredits}`, w.nextRegenAt, due));
}

function lastDays(n) {
  const out = [];
  const today = Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth(), new Date().getUTCDate());
  for (let i = n - 1; i >= 0; i--) out.push(new Date(today - i * 86400000).toISOString().slice(0, 10));
  return out;
}

function renderChart() {
  const u = customer.usage;
  if (!u) return;
  const days = lastDays(14);
  const models = [...new Set(u.rows.map((r) => r.model))].sort();
  const byDollars = customer.measure === "dollars";
  const series = models.map((m) => ({name: m, values: days.map((d) => u.rows
    .filter((r) => r.day === d && r.model === m)
    .reduce((s, r) => s + (byDollars ? r.cost_pico / PICO : r.requests), 0))}));
  const fmt = byDollars ? (v) => (v === 0 ? "$0" : usd(v * PICO)) : (v) => (Number.isInteger(v) ? int(v) : v.toFixed(1));
  stackedBars($("c-chart"), days, series, fmt, `Usage per day by model, in ${customer.measure}`, !byDollars);
  $("c-by-requests").setAttribute("aria-pressed", String(!byDollars));
  $("c-by-dollars").setAttribute("aria-pressed", String(byDollars));
}

function renderModels(u) {
  const per = new Map();
  for (const r of u.rows) {
    const m = per.get(r.model) || {requests: 0, prompt: 0, cached: 0, completion: 0, cost: 0};
    m.requests += r.requests; m.prompt += r.prompt_tokens; m.cached += r.cached_tokens;
    m.completion += r.completion_tokens; m.cost += r.cost_pico;
    per.set(r.model, m);
  }
  const row = (name, m, tag = "td") => h("tr", {}, h(tag, {text: name}), h("td", {class: "num", text: int(m.requests)}),
    h("td", {class: "num hide-narrow", text: int(m.prompt)}),
    h("td", {class: "num", text: `${int(m.cached)} (${pct(m.cached, m.prompt)})`}),
    h("td", {class: "num hide-narrow", text: int(m.completion)}), h("td", {class: "num", text: usd(m.cost)}));
  const body = [...per.entries()].sort().map(([name, m]) => row(name, m));
  $("c-models").tBodies[0].replaceChildren(...(body.length ? body
    : [h("tr", {}, h("td", {colspan: 6, class: "empty", text: "No requests in the last 14 days."}))]));
  const t = u.totals;
  $("c-models").tFoot.replaceChildren(row("Total", {requests: t.requests, prompt: t.prompt_tokens,
    cached: t.cached_tokens, completion: t.completion_tokens, cost: t.cost_pico}));
}

function keyLimits(k) {
  const parts = [];
  if (k.max_requests !== null) parts.push(`${int(k.max_requests)} requests / 5 h`);
  if (k.max_weekly_usd !== null) parts.push(`$${Number(k.max_weekly_usd).toFixed(2)} / week`);
  if (k.expires_ms !== null) parts.push(`expires ${new Date(k.expires_ms).toISOString().slice(0, 10)}`);
  if (k.disabled) parts.push("disabled");
  return parts.join(" · ") || "the account's limits";
}

function renderKeys(keys) {
  $("c-keys").tBodies[0].replaceChildren(...keys.map((k) => h("tr", {},
    h("td", {}, h("code", {text: `${k.prefix}…`}), k.current ? h("span", {class: "muted small", text: " (this key)"}) : null),
    h("td", {text: k.models.length ? k.models.join(", ") : "all"}), h("td", {text: keyLimits(k)}))));
}

function renderRefusals(r) {
  const hours = r.window_s / 3600;
  $("c-refusals-note").textContent = `On every server, the last ${hours >= 1 ? `${Math.round(hours)} hour${Math.round(hours) === 1 ? "" : "s"}`
    : `${Math.round(r.window_s / 60)} minutes`}, newest first.`;
  const rows = r.data.map((x) => h("tr", {}, h("td", {text: when(x.ts_ms)}),
    h("td", {}, h("span", {text: reasonLabel(x.reason)}), h("span", {class: "muted small", text: ` ${x.status}`})),
    h("td", {text: x.model})));
  $("c-refusals").tBodies[0].replaceChildren(...(rows.length ? rows
    : [h("tr", {}, h("td", {colspan: 3, class: "empty", text: "None: every request went through."}))]));
}

async function loadCustomer(fromForm) {
  if (fromForm) {
    customer.key = $("key").value.trim();
    sessionStorage.setItem("packserve-key", customer.key);
  }
  const key = customer.key;
  const generation = ++customer.generation;
  if (fromForm) clearCustomer();
  if (!key) { showError("c-error", "Paste an API key first."); return; }
  try {
    const [q, u, keys, refusals] = await Promise.all([api("/v2/quotas", key), api("/v2/usage?days=14", key),
      api("/v2/keys", key), api("/v2/refusals", key)]);
    if (generation !== customer.generation) return;  // a newer load (another key) won
    showError("c-error", "");
    customer.usage = u;
    $("c-data").hidden = false;  // shown before drawing: the chart is drawn at its box's width
    renderQuota(q);
    renderChart();
    renderModels(u);
    renderKeys(keys.data);
    renderRefusals(refusals);
    $("c-account").textContent = `Account ${u.account_id}`;
    $("c-updated").textContent = new Date().toLocaleTimeString("en-GB");
    $("c-data").hidden = false;
    $("c-logout").hidden = false;
  } catch (e) {
    if (generation !== customer.generation) return;
    clearCustomer();  // never show one account's data under another key's error
    showError("c-error", e.message);
  }
}

$("c-login").addEventListener("submit", (e) => { e.preventDefault(); loadCustomer(true); });
$("c-refresh").addEventListener("click", () => loadCustomer(false));
$("c-logout").addEventListener("click", () => {
  sessionStorage.removeItem("packserve-key");
  customer.key = ""; customer.generation++;
  $("key").value = ""; $("c-logout").hidden = true;
  clearCustomer(); showError("c-error", "");
});
let resizeTimer = 0;
window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(renderChart, 150); });
$("c-by-requests").addEventListener("click", () => { customer.measure = "requests"; renderChart(); });
$("c-by-dollars").addEventListener("click", () => { customer.measure = "dollars"; renderChart(); });

// ---------------------------------------------------------------- operator page

const STAT_LABELS = [
  ["in_flight", "Requests in flight here"], ["queue_depth", "Waiting for a slot here"],
  ["capacity_waiting_here", "Waiting for a model here"], ["cold_starts_waiting", "Waiting for a cold start"],
  ["settlements_pending", "Settlements not yet stored"], ["overloaded_here", "Refused as overloaded here"],
];
const op = {token: "", generation: 0, q: "", sort: "name", order: "asc", offset: 0, account: null, pending: null,
            plans: null, key: null, keyPending: null};

function tile(label, value, tone = "") {
  return h("div", {class: `tile ${tone}`}, h("div", {class: "v", text: value}), h("div", {class: "k", text: label}));
}

function renderSummary(s) {
  const store = s.store || {};
  const gateways = s.gateways || {count: 0, data: []};
  $("o-summary").replaceChildren(
    tile("Gateways live", int(gateways.count), gateways.count ? "" : "bad"),
    tile(`Store (${store.kind || "?"})`, store.ok ? `up · ${store.latency_ms < 1 ? "<1" : Math.round(store.latency_ms)} ms` : "down", store.ok ? "good" : "bad"),
    tile("Scheduler", s.scheduler === "fair" ? "fair share" : s.scheduler),
    ...STAT_LABELS.filter(([k]) => k in s).map(([k, label]) =>
      tile(label, int(s[k]), k === "settlements_pending" && s[k] > 0 ? "bad" : "")));
}

// Each live gateway's last heartbeat (the store's list; a gateway that stops beating drops out after its TTL).
function renderGateways(s) {
  const gateways = (s.gateways && s.gateways.data) || [];
  $("o-gateways-note").textContent = `${int(gateways.length)} live · this page is served by ${s.gateway_id || "?"}`;
  $("o-gateways").tBodies[0].replaceChildren(...(gateways.length ? gateways.map((g) => h("tr", {"data-gateway": g.gateway_id},
    h("td", {}, h("div", {text: g.address}), h("div", {class: "id", text: g.gateway_id + (g.gateway_id === s.gateway_id ? " (this one)" : "")})),
    h("td", {text: g.version}),
    h("td", {text: duration((g.seen_ms - g.started_ms) / 1000)}),
    h("td", {class: "num", text: int(g.in_flight)}),
    h("td", {text: when(g.seen_ms)})))
    : [h("tr", {}, h("td", {colspan: 5, class: "empty", text: "No heartbeat in the store."}))]));
  labelCells($("o-gateways"));
}

function renderModelTable(s) {
  const cap = new Map((s.capacity || []).map((c) => [c.model, c]));
  const recent = (s.recent && s.recent.models) || {};
  $("o-models-note").textContent = `Percentiles and refusals: all gateways, last ${Math.round(
    ((s.recent && s.recent.window_s) || 600) / 60)} minutes. Capacity: all gateways (the store).`;
  const rows = (s.model_states || []).map((m) => {
    const c = cap.get(m.queue_model);
    const r = recent[m.model] || recent[m.queue_model] || {};
    const refused = Object.entries(r.refusals || {});
    const replicas = m.replicas === null || m.replicas === undefined ? "" : ` · ${m.replicas} replica${m.replicas === 1 ? "" : "s"}`;
    const shared = m.queue_model !== m.model ? ` (on ${m.queue_model})` : "";
    return h("tr", {"data-model": m.model},
      h("td", {}, h("div", {text: m.model}), h("div", {class: "id", text: `${m.kind}${shared}`})),
      h("td", {}, h("span", {class: `badge ${m.state}`, text: m.state}), h("span", {class: "muted small", text: replicas})),
      h("td", {}, c ? [h("div", {class: "small", text: `${int(c.in_flight)} of ${int(c.capacity)}`}),
                       meter(c.capacity ? c.in_flight / c.capacity : 0, true, `${m.model} sequences in use`, true)]
                    : h("span", {class: "muted small", text: "not capacity-scheduled"})),
      h("td", {class: "num", text: c ? int(c.waiting) : "–"}),
      h("td", {class: "num", text: `${ms(r.wait_p50_ms)} / ${ms(r.wait_p95_ms)}`}),
      h("td", {class: "num", text: `${ms(r.ttft_p50_ms)} / ${ms(r.ttft_p95_ms)}`}),
      h("td", {}, refused.length ? h("div", {class: "chips"}, refused.map(([reason, n]) =>
        h("span", {class: "badge suspended", text: `${reasonLabel(reason)}: ${n}`}))) : h("span", {class: "muted", text: "none"})));
  });
  $("o-models").tBodies[0].replaceChildren(...rows);
  labelCells($("o-models"));
}

function accountRow(a) {
  const q = a.quotas || {};
  let req, week;
  if (q.payg) {
    req = h("span", {class: "muted small", text: "pay as you go"});
    week = h("div", {class: "small", text: `${q.payg.spentThisMonth} this month${q.payg.spendCap ? ` of ${q.payg.spendCap}` : ""}`});
  } else {
    const r = q.rollingFiveHourLimit, w = q.weeklyTokenLimit;
    req = [h("div", {class: "small", text: `${int(r.remaining)} of ${int(r.max)}`}), meter(r.remaining / r.max, true, "5-hour requests left")];
    week = [h("div", {class: "small", text: `${w.remainingCredits} of ${w.maxCredits}`}), meter(w.percentRemaining / 100, true, "weekly dollars left")];
  }
  const sched = (a.scheduler || []).map((x) => h("div", {class: "small",
    text: `${x.model.split("/").pop()}: ${int(x.weighted_tokens_per_weight)} · ${Math.round(x.share * 100)}% share · ${x.running} run, ${x.waiting} wait`}));
  return h("tr", {"data-account": a.id},
    h("td", {}, h("div", {text: a.name}), h("div", {class: "id", text: a.id})),
    h("td", {text: a.plan === "payg" ? "pay as you go" : a.packs.join(", ") || "–"}),
    h("td", {}, req), h("td", {}, week),
    h("td", {}, sched.length ? sched : h("span", {class: "muted small", text: "idle"})),
    h("td", {}, h("span", {class: `badge ${a.suspended ? "suspended" : "active"}`, text: a.suspended ? "suspended" : "active"})),
    h("td", {}, h("button", {type: "button", class: "ghost", text: "Manage", "aria-label": `Manage ${a.name}`,
      onclick: () => openAccount(a)})));
}

async function loadAccounts() {
  const qs = new URLSearchParams({q: op.q, sort: op.sort, order: op.order, offset: String(op.offset),
                                  limit: String(PAGE_SIZE)});
  const page = await api(`/admin/v1/accounts?${qs}`, op.token);
  const rows = page.data.map(accountRow);
  $("o-accounts").tBodies[0].replaceChildren(...(rows.length ? rows
    : [h("tr", {}, h("td", {colspan: 7, class: "empty", text: op.q ? "No account matches." : "No accounts yet."}))]));
  labelCells($("o-accounts"));
  const last = Math.min(page.total, page.offset + page.data.length);
  $("o-page").textContent = page.total ? `${page.offset + 1}–${last} of ${int(page.total)}` : "0 accounts";
  $("o-prev").disabled = page.offset === 0;
  $("o-next").disabled = last >= page.total;
  for (const b of document.querySelectorAll("button.sort")) {
    if (b.dataset.sort === op.sort) b.setAttribute("aria-sort", op.order === "asc" ? "ascending" : "descending");
    else b.removeAttribute("aria-sort");
  }
  return page;
}

async function loadOperator(fromForm) {
  if (fromForm) {
    op.token = $("token").value.trim();
    op.plans = null;
    sessionStorage.setItem("packserve-admin", op.token);
    $("o-data").hidden = true;
  }
  const generation = ++op.generation;
  if (!op.token) { showError("o-error", "Paste the operator token first."); return; }
  try {
    const stats = await api("/admin/v1/stats", op.token);
    if (generation !== op.generation) return;
    renderSummary(stats);
    renderGateways(stats);
    renderModelTable(stats);
    if (!op.plans) op.plans = await api("/admin/v1/plans", op.token);
    await loadAccounts();
    if (generation !== op.generation) return;
    showError("o-error", "");
    $("o-updated").textContent = new Date().toLocaleTimeString("en-GB");
    $("o-data").hidden = false;
    $("o-logout").hidden = false;
  } catch (e) {
    if (generation !== op.generation) return;
    $("o-data").hidden = true;
    showError("o-error", e.message);
  }
}

$("o-login").addEventListener("submit", (e) => { e.preventDefault(); loadOperator(true); });
$("o-refresh").addEventListener("click", () => loadOperator(false));
$("o-logout").addEventListener("click", () => {
  sessionStorage.removeItem("packserve-admin");
  op.token = ""; op.generation++; $("token").value = ""; $("o-logout").hidden = true; $("o-data").hidden = true;
});
let searchTimer = 0;
$("o-q").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { op.q = $("o-q").value; op.offset = 0; loadAccounts().catch((e) => showError("o-error", e.message)); }, 200);
});
$("o-search").addEventListener("submit", (e) => {
  e.preventDefault(); op.q = $("o-q").value; op.offset = 0; loadAccounts().catch((x) => showError("o-error", x.message));
});
for (const b of document.querySelectorAll("button.sort")) {
  b.addEventListener("click", () => {
    op.order = op.sort === b.dataset.sort && op.order === "asc" ? "desc" : "asc";
    op.sort = b.dataset.sort; op.offset = 0;
    loadAccounts().catch((e) => showError("o-error", e.message));
  });
}
$("o-prev").addEventListener("click", () => { op.offset = Math.max(0, op.offset - PAGE_SIZE); loadAccounts(); });
$("o-next").addEventListener("click", () => { op.offset += PAGE_SIZE; loadAccounts(); });

// -- the account dialog: every change asks for confirmation first

function notice(text) {
  $("o-notice").textContent = text;
  $("o-notice").hidden = !text;
}

function confirmAction(text, action) {
  op.pending = action;
  $("act-confirm-text").textContent = text;
  $("act-confirm").hidden = false;
  $("act-yes").focus();
}

async function runPending() {
  const action = op.pending;
  op.pending = null;
  $("act-confirm").hidden = true;
  if (!action) return;
  try {
    showError("act-error", "");
    await action();
  } catch (e) { showError("act-error", e.message); }
}

async function renderAccountKeys(a) {
  const keys = (await api(`/admin/v1/accounts/${encodeURIComponent(a.id)}/keys`, op.token)).data.filter((k) => !k.revoked);
  $("act-keys").replaceChildren(...(keys.length ? keys.map((k) => h("li", {},
    h("span", {}, h("code", {text: `${k.prefix}…`}), h("span", {class: "muted small", text: ` ${keyLimits(k)}`})),
    h("span", {class: "chips"},
    h("button", {type: "button", class: "ghost", text: "Edit", "aria-label": `Edit limits of key ${k.prefix}`,
      onclick: () => openKeyEditor(a, k)}),
    h("button", {type: "button", class: "ghost", text: k.disabled ? "Enable" : "Disable",
      "aria-label": `${k.disabled ? "Enable" : "Disable"} key ${k.prefix}`,
      onclick: () => confirmAction(`${k.disabled ? "Enable" : "Disable"} key ${k.prefix}…?`, async () => {
        await api(`/admin/v1/accounts/${encodeURIComponent(a.id)}/keys/${encodeURIComponent(k.id)}`, op.token,
                  {method: "PATCH", body: JSON.stringify({disabled: !k.disabled})});
        await renderAccountKeys(a);
        notice(`Key ${k.prefix}… ${k.disabled ? "enabled" : "disabled"}.`);
      })}),
    h("button", {type: "button", class: "ghost", text: "Revoke", "aria-label": `Revoke key ${k.prefix}`,
      onclick: () => confirmAction(`Revoke key ${k.prefix}…? Requests with it will be refused at once.`, async () => {
        await api(`/admin/v1/keys/${encodeURIComponent(k.id)}`, op.token, {method: "DELETE"});
        await renderAccountKeys(a);
        notice(`Key ${k.prefix}… revoked.`);
      })})))) : [h("li", {class: "muted small", text: "No keys."})]));
}

function openAccount(a) {
  op.account = a;
  op.pending = null;
  $("act-title").textContent = a.name;
  $("act-sub").textContent = `${a.id} · ${a.plan === "payg" ? "pay as you go" : "subscription"}`;
  renderPackKinds(a);
  $("act-suspend").textContent = a.suspended ? "Resume" : "Suspend";
  $("act-suspend").className = a.suspended ? "" : "danger";
  $("act-secret").hidden = true;
  $("act-confirm").hidden = true;
  for (const id of ["act-key-requests", "act-key-dollars", "act-key-models"]) $(id).value = "";
  showError("act-error", "");
  $("act-keys").replaceChildren();
  renderAccountKeys(a).catch((e) => showError("act-error", e.message));
  $("act").showModal();
}

// Packs: one count per configured kind (GET /admin/v1/plans), with what they add up to.
function chosenPacks() {
  return [...document.querySelectorAll("#act-pack-kinds select")].flatMap((sel) =>
    Array(Number(sel.value)).fill(sel.dataset.kind));
}
function packSummary(packs) {
  const byId = new Map(op.plans.packs.map((p) => [p.id, p]));
  const counts = new Map();
  for (const id of packs) counts.set(id, (counts.get(id) || 0) + 1);
  const names = [...counts].map(([id, n]) => `${n} × ${byId.get(id).name}`).join(", ");
  const sum = (f) => packs.reduce((t, id) => t + f(byId.get(id)), 0);
  const cents = sum((p) => p.monthly_price_cents);
  return {names, limits: `${int(sum((p) => p.requests))} requests / 5 h, $${int(sum((p) => p.weekly_credit_usd))} / week, ` +
                         `$${int(Math.floor(cents / 100))}.${String(cents % 100).padStart(2, "0")} / month`};
}
function renderPackSum() {
  const packs = chosenPacks();
  const max = op.plans.max_packs;
  $("act-pack-sum").textContent = !packs.length ? "No pack chosen: a subscription needs at least one."
    : packs.length > max ? `${packs.length} packs: at most ${max}.` : `${packSummary(packs).limits}.`;
  $("act-set-packs").disabled = op.account.plan !== "subscription" || !packs.length || packs.length > max;
}
function renderPackKinds(a) {
  const held = new Map();
  for (const id of a.packs) held.set(id, (held.get(id) || 0) + 1);
  $("act-pack-kinds").replaceChildren(...op.plans.packs.flatMap((p) => {
    const id = `act-pack-${p.id}`;
    const select = h("select", {id, "data-kind": p.id, disabled: a.plan !== "subscription",
      onchange: renderPackSum}, ...Array.from({length: op.plans.max_packs + 1}, (_, n) =>
        h("option", {value: n, selected: n === (held.get(p.id) || 0), text: String(n)})));
    return [h("label", {for: id}, h("span", {text: p.name}), h("span", {class: "muted small",
      text: ` $${p.monthly_price_usd} / month · ${int(p.requests)} requests / 5 h · $${int(p.weekly_credit_usd)} / week`})),
      select];
  }));
  renderPackSum();
}

$("act-set-packs").addEventListener("click", () => {
  const a = op.account;
  const packs = chosenPacks();
  const {names, limits} = packSummary(packs);
  confirmAction(`Set ${a.name}'s packs to ${names} (${limits})?`, async () => {
    op.account = await api(`/admin/v1/accounts/${encodeURIComponent(a.id)}/packs`, op.token,
                           {method: "PUT", body: JSON.stringify({packs})});
    notice(`${a.name}: packs set to ${names}.`);
    $("act").close();
    await loadOperator(false);
  });
});

// -- the key editor: a key's own limits (PATCH /admin/v1/accounts/{id}/keys/{key_id}), after a confirmation

const KEY_FIELDS = [["key-requests", "max_requests"], ["key-dollars", "max_weekly_usd"], ["key-models", "models"],
                    ["key-expires", "expires"]];

function openKeyEditor(a, k) {
  op.key = {account: a, key: k};
  op.keyPending = null;
  $("key-title").textContent = `Limits of key ${k.prefix}…`;
  $("key-requests").value = k.max_requests ?? "";
  $("key-dollars").value = k.max_weekly_usd === null ? "" : Number(k.max_weekly_usd).toFixed(2);
  $("key-models").value = k.models.join(", ");
  $("key-expires").value = k.expires_ms === null ? "" : new Date(k.expires_ms).toISOString().slice(0, 10);
  $("key-confirm").hidden = true;
  showError("key-error", "");
  $("key-edit").showModal();
  $("key-requests").focus();
}

// The PATCH body: filled fields are set; a limit the key had whose field was emptied is cleared.
function keyChanges(k) {
  const body = {}, clear = [];
  const had = {max_requests: k.max_requests !== null, max_weekly_usd: k.max_weekly_usd !== null,
               models: k.models.length > 0, expires: k.expires_ms !== null};
  for (const [id, field] of KEY_FIELDS) {
    const raw = $(id).value.trim();
    if (!raw) { if (had[field]) clear.push(field); continue; }
    if (field === "max_requests") body[field] = Number(raw);
    else if (field === "models") body[field] = raw.split(",").map((m) => m.trim()).filter(Boolean);
    else body[field] = raw;
  }
  if (clear.length) body.clear = clear;
  return body;
}

function describeKeyChanges(body) {
  const parts = [];
  if (body.max_requests !== undefined) parts.push(`${int(body.max_requests)} requests / 5 h`);
  if (body.max_weekly_usd !== undefined) parts.push(`$${Number(body.max_weekly_usd).toFixed(2)} / week`);
  if (body.models) parts.push(`models ${body.models.join(", ")}`);
  if (body.expires) parts.push(`expires ${body.expires}`);
  for (const field of body.clear || []) parts.push(`no ${field.replaceAll("_", " ")} limit`);
  return parts.join(" · ");
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const {account: a, key: k} = op.key;
  const body = keyChanges(k);
  showError("key-error", "");
  op.keyPending = async () => {
    await api(`/admin/v1/accounts/${encodeURIComponent(a.id)}/keys/${encodeURIComponent(k.id)}`, op.token,
              {method: "PATCH", body: JSON.stringify(body)});
    $("key-edit").close();
    await renderAccountKeys(a);
    const again = [...document.querySelectorAll("#act-keys button")].find((x) =>
      x.getAttribute("aria-label") === `Edit limits of key ${k.prefix}`);
    if (again) again.focus();  // the list was redrawn: keep the keyboard where it was
    notice(`Key ${k.prefix}… limits saved: ${describeKeyChanges(body) || "unchanged"}.`);
  };
  $("key-confirm-text").textContent = `Set key ${k.prefix}…'s limits: ${describeKeyChanges(body) || "no change"}?`;
  $("key-confirm").hidden = false;
  $("key-yes").focus();
});
$("key-yes").addEventListener("click", async () => {
  const action = op.keyPending;
  op.keyPending = null;
  $("key-confirm").hidden = true;
  if (!action) return;
  try { await action(); } catch (e) { showError("key-error", e.message); }
});
$("key-no").addEventListener("click", () => { op.keyPending = null; $("key-confirm").hidden = true; $("key-requests").focus(); });
$("key-close").addEventListener("click", () => $("key-edit").close());
$("act-suspend").addEventListener("click", () => {
  const a = op.account;
  const verb = a.suspended ? "resume" : "suspend";
  confirmAction(a.suspended ? `Resume ${a.name}? Its keys work again at once.`
                            : `Suspend ${a.name}? Every request with its keys is refused until resumed.`, async () => {
    await api(`/admin/v1/accounts/${encodeURIComponent(a.id)}/${verb}`, op.token, {method: "POST"});
    notice(`${a.name} ${a.suspended ? "resumed" : "suspended"}.`);
    $("act").close();
    await loadOperator(false);
  });
});
$("act-new-key").addEventListener("click", () => {
  const a = op.account;
  // Per-key limits (docs/plans.md): only the fields filled in are sent; empty ones keep the account's.
  const limits = {};
  if ($("act-key-requests").value) limits.max_requests = Number($("act-key-requests").value);
  if ($("act-key-dollars").value) limits.max_weekly_usd = $("act-key-dollars").value;
  const models = $("act-key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) limits.models = models;
  const described = Object.keys(limits).length ? keyLimits({max_requests: null, max_weekly_usd: null, expires_ms: null,
    ...limits}) + (models.length ? ` · ${models.join(", ")}` : "") : "the account's limits";
  confirmAction(`Create a new key for ${a.name} (${described})?`, async () => {
    const created = await api(`/admin/v1/accounts/${encodeURIComponent(a.id)}/keys`, op.token,
                              {method: "POST", body: JSON.stringify(limits)});
    for (const id of ["act-key-requests", "act-key-dollars", "act-key-models"]) $(id).value = "";
    $("act-secret").textContent = `New key (shown once): ${created.key}`;
    $("act-secret").hidden = false;
    await renderAccountKeys(a);
  });
});
$("act-yes").addEventListener("click", runPending);
$("act-no").addEventListener("click", () => { op.pending = null; $("act-confirm").hidden = true; });

// ---------------------------------------------------------------- start

$("key").value = customer.key = sessionStorage.getItem("packserve-key") || "";
$("token").value = op.token = sessionStorage.getItem("packserve-admin") || "";
show(location.hash === "#operator" ? "operator" : "customer");
if (customer.key) loadCustomer(false);
if (op.token) loadOperator(false);
if (REFRESH_MS > 0) {
  setInterval(() => {
    if (document.hidden) return;
    if (customer.key && !$("customer").hidden) loadCustomer(false);
    if (op.token && !$("operator").hidden && !$("act").open) loadOperator(false);
  }, REFRESH_MS);
}
