"""policies.fairness: the VTC rules as tables, and the same tables against their Lua twin (cluster/lua/fairness.lua)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from cluster.redis_store import lua_source
from policies.fairness import (
    INPUT_WEIGHT,
    MAX_WEIGHT,
    OUTPUT_WEIGHT,
    WEIGHT_SCALE,
    SchedulerMode,
    Waiting,
    account_weight,
    counter_units,
    dispatch_allows,
    lift,
    pick,
    preemption_victim,
    service_units,
)

TABLES = json.loads((Path(__file__).resolve().parents[1] / "policies" / "vectors" / "fairness" /
                     "ordering.json").read_text(encoding="utf-8"))
LIFTS = TABLES["lift"]
PICKS = TABLES["pick"]
PREEMPTS = TABLES["preempt"]


# -- counter growth and weights -----------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "completion", "expected"), [
    (0, 0, 0), (100, 0, 100 * INPUT_WEIGHT), (0, 50, 50 * OUTPUT_WEIGHT), (10, 20, 10 + 40)])
def test_service_counts_prompt_and_output_tokens_as_the_paper_weights_them(
        prompt: int, completion: int, expected: int) -> None:
    assert service_units(prompt, completion) == expected


def test_weight_scale_divides_by_every_allowed_weight_exactly() -> None:
    assert WEIGHT_SCALE == 2520
    for weight in range(1, MAX_WEIGHT + 1):
        assert WEIGHT_SCALE % weight == 0
        assert counter_units(7, weight) * weight == 7 * WEIGHT_SCALE


@pytest.mark.parametrize(("service", "weight", "expected"), [
    (100, 1, 252_000), (100, 5, 50_400), (100, 3, 84_000), (0, 2, 0)])
def test_counter_grows_by_service_over_weight(service: int, weight: int, expected: int) -> None:
    assert counter_units(service, weight) == expected


def test_five_packs_receive_five_times_the_service_for_the_same_counter() -> None:
    assert counter_units(500, 5) == counter_units(100, 1)


@pytest.mark.parametrize(("packs", "payg", "expected"), [(1, 1, 1), (5, 1, 5), (None, 1, 1), (None, 4, 4)])
def test_account_weight(packs: int | None, payg: int, expected: int) -> None:
    assert account_weight(packs, payg) == expected


@pytest.mark.parametrize(("packs", "payg"), [(0, 1), (6, 1), (None, 0), (None, MAX_WEIGHT + 1)])
def test_bad_weights_are_refused(packs: int | None, payg: int) -> None:
    with pytest.raises(ValueError, match="1 to"):
        account_weight(packs, payg)


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        service_units(-1, 0)
    with pytest.raises(ValueError):
        counter_units(-1, 1)


def test_dispatch_allows_only_below_capacity() -> None:
    assert dispatch_allows(1, 2)
    assert not dispatch_allows(2, 2)
    assert not dispatch_allows(0, 0)


# -- lift on return and pick, Python ------------------------------------------------------------

@pytest.mark.parametrize("case", LIFTS, ids=[c["name"] for c in LIFTS])
def test_lift_python(case: dict[str, Any]) -> None:
    assert lift(case["counter"], case["active"], case["last"]) == case["expect"]


@pytest.mark.parametrize("case", PICKS, ids=[c["name"] for c in PICKS])
def test_pick_python(case: dict[str, Any]) -> None:
    chosen = pick([Waiting(seq, acct) for seq, acct in case["waiting"]], case["counters"],
                  SchedulerMode(case["mode"]), case.get("active"))
    assert (None if chosen is None else chosen.seq) == case["expect"]


@pytest.mark.parametrize("case", PREEMPTS, ids=[c["name"] for c in PREEMPTS])
def test_preemption_victim_python(case: dict[str, Any]) -> None:
    assert preemption_victim(case["waiter"], case["counters"], case["active"], case["running"],
                             case.get("paused")) == case["expect"]


def test_a_backlogged_heavy_account_cannot_starve_a_light_one() -> None:
    """Replay: one sequence, a heavy account with 5 packs and a light one with 1, both always waiting.

    The light one is served once per five of the heavy one's equal requests: its weight share.
    """
    counters = {"heavy": 0, "light": 0}
    weights = {"heavy": 5, "light": 1}
    served = {"heavy": 0, "light": 0}
    for seq in range(1, 61):
        waiting = [Waiting(seq, "heavy"), Waiting(seq + 1, "light")]
        chosen = pick(waiting, counters, SchedulerMode.FAIR)
        assert chosen is not None
        counters[chosen.account_id] += counter_units(service_units(10, 20), weights[chosen.account_id])
        served[chosen.account_id] += 1
    assert served == {"heavy": 50, "light": 10}


# -- the same tables against the Lua twin -------------------------------------------------------

PROBE = lua_source("fairness", ("bars",)) + """
local case = cjson.decode(ARGV[1])
if ARGV[2] == 'preempt' then
  return preemption_victim(case.waiter, case.counters, case.active, case.running, case.paused) or ''
end
if ARGV[2] == 'lift' then
  local last = case.last
  if last == cjson.null then last = nil end
  return fmt(lift(case.counter, case.active, last))
end
local waiting = {}
for _, w in ipairs(case.waiting) do waiting[#waiting + 1] = {seq = w[1], account = w[2]} end
local active = case.active
if active == nil then active = {} end
local chosen = pick(waiting, case.counters, case.mode, active)
if chosen == nil then return '' end
return fmt(chosen.seq)
"""


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("case", LIFTS, ids=[c["name"] for c in LIFTS])
async def test_lift_lua(redis: Redis, case: dict[str, Any]) -> None:
    assert int(await redis.eval(PROBE, 0, json.dumps(case), "lift")) == case["expect"]


@pytest.mark.parametrize("case", PICKS, ids=[c["name"] for c in PICKS])
async def test_pick_lua(redis: Redis, case: dict[str, Any]) -> None:
    raw = (await redis.eval(PROBE, 0, json.dumps(case), "pick")).decode()
    assert (None if raw == "" else int(raw)) == case["expect"]


@pytest.mark.parametrize("case", PREEMPTS, ids=[c["name"] for c in PREEMPTS])
async def test_preemption_victim_lua(redis: Redis, case: dict[str, Any]) -> None:
    raw = (await redis.eval(PROBE, 0, json.dumps(case), "preempt")).decode()
    assert (None if raw == "" else raw) == case["expect"]
