"""Runner for the shared JSON test vectors (policies/vectors/*.json).

A vector is a plan plus steps on one account's two bars. This module turns a
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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from policies.admission import Admit, check_bars, refund_request, settle_weekly
from policies.bars import BarSpec, BarState, next_tick_ms, settle
from policies.plans import PlanKind, SizeClass, parse_packs, subscription_limits
from policies.pricing import ModelPrice, WeightPolicy, token_cost_pico
from policies.units import PICO_PER_DOLLAR, dollars_to_micro

Json = dict[str, Any]


def _price(model: Mapping[str, Any]) -> ModelPrice:
    override = model.get("weight")
    return ModelPrice(
        input_micro=dollars_to_micro(model.get("input", "0")),
        output_micro=dollars_to_micro(model.get("output", "0")),
        size_class=SizeClass(model.get("size", "standard")),
        weight_override=None if override is None else Fraction(str(override)),
    )


def compile_vector(vector: Mapping[str, Any]) -> tuple[BarSpec, BarSpec, int, list[Json]]:
    """Resolve prices and plans to integers: (request spec, weekly spec, unit, steps)."""
    policy = WeightPolicy(reference_price_micro=dollars_to_micro(vector.get("reference_price", "3.40")))
    limits = subscription_limits(parse_packs(vector["packs"]))
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
                    cache_discount=plan is PlanKind.SUBSCRIPTION)
            else:
                step["cost_pico"] = int(raw.get("cost_pico", 0))
            step["refund_units"] = policy.units(_price(raw["model"])) if raw.get("refund") else 0
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
    out: list[Json] = []
    for step in steps:
        now = step["at_ms"]
        obs: Json = {}
        if step["op"] == "reserve":
            admitted = 0
            for _ in range(step["repeat"]):
                decision = check_bars(req_spec, req, wk_spec, wk, step["weight_units"], now)
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
        elif step["op"] == "set":
            req = BarState(step.get("request_level", req.level), step.get("request_anchor_ms", req.anchor_ms))
            wk = BarState(step.get("weekly_level", wk.level), step.get("weekly_anchor_ms", wk.anchor_ms))
        elif step["op"] == "state":
            obs = observe_state(req_spec, req, wk_spec, wk, unit, now)
        else:
            raise ValueError(f"unknown vector op {step['op']!r}")
        out.append(obs)
    return out
