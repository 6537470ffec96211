"""Runner for the shared JSON test vectors (policies/vectors/*.json).

A vector is a plan plus steps on one account's two bars. The plan is SPEC §1's
unless the vector says otherwise: `request_bar` / `weekly_bar`
{tick_percent, tick_minutes}, `weight_basis` (output|input), `reference_price`,
`cache_read_discount_percent`. This module turns a
vector into concrete integer inputs (`compile_steps`) and runs them against
the Python policies (`run_python`). The Lua harness runs the same compiled
steps; tests compare both against each step's `expect`.

Step ops (times in ms, money in picodollars, request bar in request units):
- reserve  {at_ms, model: {input, output, size?, weight?}, repeat?}
           observes {admitted, reason, retry_after_s}
- settle   {at_ms, cost_pico? | tokens: {prompt, cached, completion}, refund?}
- state    {at_ms} observes {request_level, request_anchor_ms, weekly_level, weekly_anchor_ms,
           request_next_tick_ms, weekly_next_tick_ms, requests_remaining, weekly_dollars}
- set      {request_level?, request_anchor_ms?, weekly_level?, weekly_anchor_ms?}
- replan   {at_ms, packs, request_bar?, weekly_bar?, reference_price?}: the plan changes now;
           both bars keep their remaining fraction (policies.bars.rescale); later
           `requests_remaining` observations still count in the vector's first unit
- key_caps {max_requests?, max_weekly_usd?}: from here on, reserves and settles also go
           through one API key's own capped bars (policies.admission.check_key_bars),
           starting full; `state` then also observes key_request_level, key_weekly_level
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Any

from policies.admission import Admit, check_bars, check_key_bars, refund_request, settle_weekly
from policies.bars import BarSpec, BarState, next_tick_ms, rescale, settle
from policies.plans import DEFAULT_CATALOG, BarSchedule, PlanCatalog, PlanKind, SizeClass
from policies.pricing import ModelPrice, WeightBasis, WeightPolicy, token_cost_pico
from policies.units import MINUTE_MS, PICO_PER_DOLLAR, dollars_to_micro

Json = dict[str, Any]


def _price(model: Mapping[str, Any]) -> ModelPrice:
    override = model.get("weight")
    return ModelPrice(
        input_micro=dollars_to_micro(model.get("input", "0")),
        output_micro=dollars_to_micro(model.get("output", "0")),
        size_class=SizeClass(model.get("size", "standard")),
        weight_override=None if override is None else Fraction(str(override)),
    )


def _spec_json(spec: BarSpec) -> Json:
    return {"capacity": spec.capacity, "tick_amount": spec.tick_amount, "tick_ms": spec.tick_ms}


def _spec_of(raw: Mapping[str, int]) -> BarSpec:
    return BarSpec(raw["capacity"], raw["tick_amount"], raw["tick_ms"])


def _schedule(raw: Mapping[str, Any] | None, default: BarSchedule) -> BarSchedule:
    if raw is None:
        return default
    return BarSchedule(int(raw["tick_percent"]), int(raw["tick_minutes"]) * MINUTE_MS)


def compile_vector(vector: Mapping[str, Any]) -> tuple[BarSpec, BarSpec, int, list[Json]]:
    """Resolve prices and plans to integers: (request spec, weekly spec, unit, steps)."""
    policy = WeightPolicy(reference_price_micro=dollars_to_micro(vector.get("reference_price", "3.40")),
                          basis=WeightBasis(vector.get("weight_basis", "output")),
                          cache_read_discount=Fraction(int(vector.get("cache_read_discount_percent", 80)), 100))
    catalog = PlanCatalog(DEFAULT_CATALOG.packs, _schedule(vector.get("request_bar"), DEFAULT_CATALOG.request_schedule),
                          _schedule(vector.get("weekly_bar"), DEFAULT_CATALOG.weekly_schedule))
    limits = catalog.limits(catalog.parse_packs(vector["packs"]))
    plan = PlanKind(vector.get("plan", "subscription"))
    steps: list[Json] = []
    for raw in vector["steps"]:
        step: Json = {"op": raw["op"], "at_ms": int(raw.get("at_ms", 0))}
        if raw["op"] == "reserve":
            step["weight_units"] = policy.units(_price(raw["model"]))
            step["repeat"] = int(raw.get("repeat", 1))
        elif raw["op"] == "settle":
            if "tokens" in raw:
                t = raw["tokens"]
                step["cost_pico"] = token_cost_pico(
                    _price(raw["model"]), t["prompt"], t.get("cached", 0), t["completion"],
                    cache_discount=plan is PlanKind.SUBSCRIPTION, discount=policy.cache_read_discount)
            else:
                step["cost_pico"] = int(raw.get("cost_pico", 0))
            step["refund_units"] = policy.units(_price(raw["model"])) if raw.get("refund") else 0
        elif raw["op"] == "replan":
            new_policy = replace(policy, reference_price_micro=dollars_to_micro(
                raw.get("reference_price", vector.get("reference_price", "3.40"))))
            new_catalog = PlanCatalog(catalog.packs, _schedule(raw.get("request_bar"), catalog.request_schedule),
                                      _schedule(raw.get("weekly_bar"), catalog.weekly_schedule))
            new_limits = new_catalog.limits(new_catalog.parse_packs(raw["packs"]))
            step["request"] = _spec_json(new_limits.request_bar(new_policy.unit))
            step["weekly"] = _spec_json(new_limits.weekly_bar())
        elif raw["op"] == "key_caps":
            req_cap = raw.get("max_requests")
            wk_cap = raw.get("max_weekly_usd")
            step["request"] = None if req_cap is None else _spec_json(
                catalog.request_schedule.spec(int(req_cap) * policy.unit))
            step["weekly"] = None if wk_cap is None else _spec_json(
                catalog.weekly_schedule.spec(dollars_to_micro(wk_cap) * PICO_PER_DOLLAR // 1_000_000))
        elif raw["op"] == "set":
            for key in ("request_level", "request_anchor_ms", "weekly_level", "weekly_anchor_ms"):
                if key in raw:
                    step[key] = raw[key]
        steps.append(step)
    return limits.request_bar(policy.unit), limits.weekly_bar(), policy.unit, steps


def observe_state(req_spec: BarSpec, req: BarState, wk_spec: BarSpec, wk: BarState, unit: int,
                  now_ms: int) -> Json:
    r = settle(req_spec, req, now_ms)
    w = settle(wk_spec, wk, now_ms)
    return {
        "request_level": r.level,
        "request_anchor_ms": r.anchor_ms,
        "weekly_level": w.level,
        "weekly_anchor_ms": w.anchor_ms,
        "request_next_tick_ms": next_tick_ms(req_spec, r, now_ms),
        "weekly_next_tick_ms": next_tick_ms(wk_spec, w, now_ms),
        "requests_remaining": str(Fraction(r.level, unit)),
        "weekly_dollars": str(Fraction(w.level, PICO_PER_DOLLAR)),
    }


def run_python(req_spec: BarSpec, wk_spec: BarSpec, unit: int, steps: Sequence[Json]) -> list[Json]:
    """Apply compiled steps with the Python policies; one observation per step."""
    req = BarState.full(req_spec)
    wk = BarState.full(wk_spec)
    key_req_spec: BarSpec | None = None
    key_wk_spec: BarSpec | None = None
    key_req: BarState | None = None
    key_wk: BarState | None = None
    out: list[Json] = []
    for step in steps:
        now = step["at_ms"]
        obs: Json = {}
        if step["op"] == "reserve":
            admitted = 0
            for _ in range(step["repeat"]):
                decision = check_bars(req_spec, req, wk_spec, wk, step["weight_units"], now)
                if isinstance(decision, Admit) and (key_req_spec or key_wk_spec):
                    key_decision = check_key_bars(key_req_spec, key_req, key_wk_spec, key_wk, step["weight_units"],
                                                  now)
                    if isinstance(key_decision, Admit):
                        key_req = key_decision.request if key_req_spec else None
                        key_wk = key_decision.weekly if key_wk_spec else None
                    else:
                        decision = key_decision
                if isinstance(decision, Admit):
                    req, wk = decision.request, decision.weekly
                    admitted += 1
                else:
                    obs["reason"] = decision.reason.value
                    obs["retry_after_s"] = decision.retry_after_s
            obs["admitted"] = admitted
        elif step["op"] == "settle":
            wk = settle_weekly(wk_spec, wk, step["cost_pico"], now)
            if step["refund_units"]:
                req = refund_request(req_spec, req, step["refund_units"], now)
            if key_wk_spec is not None and key_wk is not None:
                key_wk = settle_weekly(key_wk_spec, key_wk, step["cost_pico"], now)
            if key_req_spec is not None and key_req is not None and step["refund_units"]:
                key_req = refund_request(key_req_spec, key_req, step["refund_units"], now)
        elif step["op"] == "key_caps":
            key_req_spec = None if step["request"] is None else _spec_of(step["request"])
            key_wk_spec = None if step["weekly"] is None else _spec_of(step["weekly"])
            key_req = None if key_req_spec is None else BarState.full(key_req_spec)
            key_wk = None if key_wk_spec is None else BarState.full(key_wk_spec)
        elif step["op"] == "replan":
            new_req, new_wk = _spec_of(step["request"]), _spec_of(step["weekly"])
            req, wk = rescale(req_spec, new_req, req, now), rescale(wk_spec, new_wk, wk, now)
            req_spec, wk_spec = new_req, new_wk
        elif step["op"] == "set":
            req = BarState(step.get("request_level", req.level), step.get("request_anchor_ms", req.anchor_ms))
            wk = BarState(step.get("weekly_level", wk.level), step.get("weekly_anchor_ms", wk.anchor_ms))
        elif step["op"] == "state":
            obs = observe_state(req_spec, req, wk_spec, wk, unit, now)
            if key_req_spec is not None and key_req is not None:
                obs["key_request_level"] = settle(key_req_spec, key_req, now).level
            if key_wk_spec is not None and key_wk is not None:
                obs["key_weekly_level"] = settle(key_wk_spec, key_wk, now).level
        else:
            raise ValueError(f"unknown vector op {step['op']!r}")
        out.append(obs)
    return out
