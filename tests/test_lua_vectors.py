"""The shared policy vectors, run against the Python policies AND the Lua scripts.

Each vector is compiled once by `policies.vectors.compile_vector`; both
implementations run the same integer steps, each step's `expect` is checked
against both, and the two observation lists must be identical.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from cluster.redis_store import LUA_DIR, lua_source
from policies.admission import month_bounds_ms
from policies.bars import BarSpec
from policies.units import DAY_MS, PICO_PER_DOLLAR
from policies.vectors import compile_vector, run_python

VECTOR_DIR = Path(__file__).resolve().parents[1] / "policies" / "vectors"
VECTORS = [
    (path.name, vector)
    for path in sorted(VECTOR_DIR.glob("*.json"))
    for vector in json.loads(path.read_text(encoding="utf-8"))
]
HARNESS = lua_source("vector_harness", ("bars",))

Json = dict[str, Any]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _spec(spec: BarSpec) -> Json:
    return {"capacity": spec.capacity, "tick_amount": spec.tick_amount, "tick_ms": spec.tick_ms}


async def run_lua(redis: Redis, req: BarSpec, wk: BarSpec, unit: int, steps: list[Json]) -> list[Json]:
    payload = {
        "request": _spec(req),
        "weekly": _spec(wk),
        "unit": unit,
        "pico_per_dollar": PICO_PER_DOLLAR,
        "steps": steps,
    }
    raw = await redis.eval(HARNESS, 0, json.dumps(payload))
    result: list[Json] = json.loads(raw)
    return result


def test_vectors_were_found() -> None:
    assert len(VECTORS) >= 10


@pytest.mark.parametrize(("source", "vector"), VECTORS, ids=[f"{s}:{v['name']}" for s, v in VECTORS])
async def test_vector(redis: Redis, source: str, vector: Json) -> None:
    req, wk, unit, steps = compile_vector(vector)
    python = run_python(req, wk, unit, steps)
    lua = await run_lua(redis, req, wk, unit, steps)
    for index, raw in enumerate(vector["steps"]):
        for key, expected in raw.get("expect", {}).items():
            assert python[index].get(key, "<missing>") == expected, f"python, step {index} ({raw['op']}): {key}"
            assert lua[index].get(key, "<missing>") == expected, f"lua, step {index} ({raw['op']}): {key}"
    assert lua == python


async def test_lua_harness_detects_a_wrong_expectation(redis: Redis) -> None:
    """Guard against a harness that echoes anything: a changed bar must change the observation."""
    vector = {
        "packs": ["standard"],
        "steps": [{"op": "reserve", "at_ms": 0, "model": {"output": "3.40"}, "repeat": 3}, {"op": "state", "at_ms": 0}],
    }
    req, wk, unit, steps = compile_vector(vector)
    lua = await run_lua(redis, req, wk, unit, steps)
    assert lua[0] == {"admitted": 3}
    assert lua[1]["requests_remaining"] == "497"
    assert lua[1]["request_level"] == 497 * unit


# Month boundaries exercise the Lua civil-date arithmetic used for payg spend caps.
MONTH_SAMPLES = [
    0,
    1,
    DAY_MS * 31 - 1,
    DAY_MS * 31,
    951_782_400_000,
    951_868_799_999,
    951_868_800_000,
    1_709_164_800_000,
    1_709_251_199_999,
    1_735_689_599_999,
    1_735_689_600_000,
    4_102_444_800_000,
    *(1_600_000_000_000 + i * 2_592_000_123 for i in range(40)),
]


async def test_month_bounds_match_python(redis: Redis) -> None:
    bars = (LUA_DIR / "bars.lua").read_text(encoding="utf-8")
    probe = bars + "\nlocal s, e = month_bounds(tonumber(ARGV[1]))\nreturn {fmt(s), fmt(e)}"
    for now in MONTH_SAMPLES:
        start, end = await redis.eval(probe, 0, now)
        assert (int(start), int(end)) == month_bounds_ms(now), now
