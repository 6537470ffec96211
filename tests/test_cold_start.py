"""Cold starts through the gateway, in process: the wait happens before admission.

A `ColdEngine` wraps the simulated engine with the `Engine` cold-start
methods (`is_warm`, `ensure_ready`) and a start the test releases by hand, so
every step of a cold start (waiting, timing out, another model served
meanwhile, the admin warm call) is observed deterministically. tests/test_ray_scaling.py does the same
against real Ray Serve scaling from zero.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from serve_apps.engines.sim import SimulatedEngine
from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    ModelStarting,
    SamplingParams,
    ToolSpec,
)
from serve_apps.gateway.app import build_gateway_app, create_runtime
from serve_apps.gateway.errors import COLD_START_RETRY_AFTER_S
from tests.live_gateway import ADMIN_TOKEN, LiveGateway

LARGE = "hf:packserve/sim-large"  # the cold model
SMALL = "hf:packserve/sim-small"  # always warm
FULL_BAR = 500  # one standard pack; sim-large weighs exactly 1 request at the $3.40 reference


class ColdEngine(Engine):
    """The simulated engine behind a start the test controls (one Event per gateway loop)."""

    def __init__(self, engine: SimulatedEngine) -> None:
        self.engine = engine
        self.started: asyncio.Event | None = None
        self.start_requests = 0
        # Models a warm flag one replica-watch poll stale: is_warm says yes
        # while the model is at zero, to every reader (the admission path,
        # /admin/v1/stats, /v1/models), until a dispatch finds it cold
        # (DeploymentEngine raises ModelStarting when it sees zero replicas).
        self.stale_warm_flags = 0

    def cards(self) -> list[ModelCard]:
        return self.engine.cards()

    async def count_tokens(self, model: str, messages: tuple[ChatMessage, ...], prompt: str | None,
                           tools: tuple[ToolSpec, ...]) -> int:
        return await self.engine.count_tokens(model, messages, prompt, tools)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self.engine.embed(request)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def _event(self) -> asyncio.Event:
        if self.started is None:
            self.started = asyncio.Event()
        return self.started

    def is_warm(self, model: str) -> bool:
        return self._event().is_set() or self.stale_warm_flags > 0

    async def ensure_ready(self, model: str, timeout_s: float) -> bool:
        event = self._event()
        if event.is_set():
            return True
        self.start_requests += 1
        if timeout_s <= 0:
            return False
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if not self._event().is_set():
            # The dispatch found zero replicas: the flag is fresh again.
            self.stale_warm_flags = max(0, self.stale_warm_flags - 1)
            return self._found_cold()
        return self.engine.generate(request)

    async def _found_cold(self) -> AsyncGenerator[GenerationChunk, None]:
        raise ModelStarting()
        yield  # pragma: no cover  (makes this an async generator)


class ColdGateway(LiveGateway):
    """LiveGateway whose sim-large is a ColdEngine."""

    def __init__(self, *, cold_start_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        gateway = self.config.gateway.model_copy(update={"cold_start_timeout_s": cold_start_timeout_s})
        self.config = self.config.model_copy(update={"gateway": gateway})
        self.cold = ColdEngine(self.engine)

    async def _serve(self) -> None:
        import uvicorn

        self.loop = asyncio.get_running_loop()
        cards = {c.id: c for c in self.engine.cards()}
        engines: dict[str, Engine] = {cid: self.engine for cid in cards}
        engines[LARGE] = self.cold
        self.runtime = await create_runtime(self.config, engines, cards, admin_token=ADMIN_TOKEN)
        self._server = uvicorn.Server(uvicorn.Config(build_gateway_app(self.runtime), host="127.0.0.1",
                                                     port=self.port, log_level="warning", access_log=False))
        await self._server.serve()

    def release(self) -> None:
        async def go() -> None:
            self.cold._event().set()

        self.run(go())

    def stats(self) -> dict[str, Any]:
        r = self.admin.get("/admin/v1/stats")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def warm_flags(self) -> dict[str, bool]:
        r = httpx.get(f"{self.base_url}/v1/models", timeout=10)
        return {m["id"]: m.get("warm") for m in r.json()["data"]}


def running(cold_start_timeout_s: float, redis_url: str, data_dir: Path) -> Iterator[ColdGateway]:
    gateway = ColdGateway(cold_start_timeout_s=cold_start_timeout_s, redis_url=redis_url, data_dir=data_dir,
                          queue_timeout_s=0)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture
def slow(redis_url: str, tmp_path: Path) -> Iterator[ColdGateway]:
    yield from running(30, redis_url, tmp_path)


@pytest.fixture
def fast(redis_url: str, tmp_path: Path) -> Iterator[ColdGateway]:
    yield from running(0.3, redis_url, tmp_path)


def chat_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def wait_until(predicate: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_first_request_waits_uncharged_while_other_models_serve(slow: ColdGateway) -> None:
    account, key = slow.new_key()
    headers = {"authorization": f"Bearer {key}"}
    result: dict[str, httpx.Response] = {}

    def first() -> None:
        result["r"] = httpx.post(f"{slow.base_url}/v1/chat/completions", json=chat_body(LARGE), headers=headers,
                                 timeout=30)

    waiter = threading.Thread(target=first)
    waiter.start()
    wait_until(lambda: slow.stats()["cold_starts_waiting"] == 1)
    # Waiting, not admitted: no slot, no queue place, no charge.
    stats = slow.stats()
    assert stats["in_flight"] == 0 and stats["queue_depth"] == 0
    assert slow.quotas(key)["rollingFiveHourLimit"]["remaining"] == FULL_BAR
    assert slow.warm_flags()[LARGE] is False and slow.warm_flags()[SMALL] is True
    started = time.monotonic()
    assert httpx.get(f"{slow.base_url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 1
    # The same account on a warm model is admitted and served meanwhile.
    other = httpx.post(f"{slow.base_url}/v1/chat/completions", json=chat_body(SMALL), headers=headers, timeout=10)
    assert other.status_code == 200, other.text
    assert waiter.is_alive()

    slow.release()
    waiter.join(timeout=10)
    assert result["r"].status_code == 200, result["r"].text
    assert slow.warm_flags()[LARGE] is True
    events = [e for e in slow.usage_events(account) if e["model"] == LARGE]
    assert len(events) == 1 and events[0]["status"] == "ok"
    small_weight = FULL_BAR - float(slow.quotas(key)["rollingFiveHourLimit"]["remaining"]) - 1
    assert 0.5 < small_weight < 0.6  # $2.00/$3.40: the request bar was charged once per request, no more


def test_a_stale_warm_flag_gives_the_slot_and_charge_back_and_waits(slow: ColdGateway) -> None:
    """Admitted on a warm flag that was stale: the dispatch finds zero replicas, is refunded, waits uncharged."""
    account, key = slow.new_key()
    slow.cold.stale_warm_flags = 1
    client = openai.OpenAI(base_url=f"{slow.base_url}/v1", api_key=key, max_retries=0)
    result: dict[str, Any] = {}

    def first() -> None:
        result["r"] = client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=3)

    waiter = threading.Thread(target=first)
    waiter.start()
    wait_until(lambda: slow.stats()["cold_starts_waiting"] == 1)
    # Back to waiting before admission: the slot is free and the bar is whole again.
    assert slow.stats()["in_flight"] == 0
    wait_until(lambda: slow.quotas(key)["rollingFiveHourLimit"]["remaining"] == FULL_BAR)
    assert waiter.is_alive()

    slow.release()
    waiter.join(timeout=10)
    assert result["r"].choices[0].message.content
    def statuses() -> list[str]:
        return sorted(e["status"] for e in slow.usage_events(account) if e["model"] == LARGE)

    # Settlement runs in its own task, after the answer was sent: the usage record follows within moments.
    wait_until(lambda: len(statuses()) == 2, timeout_s=5)
    assert statuses() == ["ok", "refunded"]
    assert slow.quotas(key)["rollingFiveHourLimit"]["remaining"] == FULL_BAR - 1  # charged once, for the answer
    metrics = httpx.get(f"{slow.base_url}/metrics", timeout=5).text
    assert f'packserve_cold_redispatches_total{{model="{LARGE}"}} 1.0' in metrics
    assert f'packserve_cold_start_wait_seconds_count{{model="{LARGE}",outcome="ready"}} 1.0' in metrics
    assert "packserve_cold_starts_waiting 0.0" in metrics


def test_past_the_timeout_a_503_in_each_api_shape_and_nothing_charged(fast: ColdGateway) -> None:
    account, key = fast.new_key()
    client = openai.OpenAI(base_url=f"{fast.base_url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as oa:
        client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert oa.value.status_code == 503
    assert oa.value.response.headers["retry-after"] == str(COLD_START_RETRY_AFTER_S)
    error = oa.value.response.json()["error"]
    assert error["code"] == "model_cold_start_timeout" and "0.3 s" in error["message"]

    ant = anthropic.Anthropic(base_url=f"{fast.base_url}/anthropic", api_key=key, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as an:
        ant.messages.create(model=LARGE, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert an.value.status_code == 503
    assert an.value.response.headers["retry-after"] == str(COLD_START_RETRY_AFTER_S)
    body = an.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert "starting from zero replicas" in body["error"]["message"]

    assert fast.quotas(key)["rollingFiveHourLimit"]["remaining"] == FULL_BAR
    assert fast.usage_events(account) == []
    assert fast.cold.start_requests == 2


def test_admin_warm_starts_a_cold_model_ahead_of_traffic(fast: ColdGateway) -> None:
    path = f"/admin/v1/models/{LARGE}/warm"
    assert fast.admin.post(path, headers={"authorization": "Bearer wrong"}).status_code == 401
    r = fast.admin.post(path)
    assert r.status_code == 202, r.text
    assert r.json() == {"model": LARGE, "warm": False, "status": "starting"}
    assert fast.cold.start_requests == 1
    fast.release()
    r = fast.admin.post(path)
    assert r.status_code == 200 and r.json()["status"] == "warm"
    assert fast.admin.post(f"/admin/v1/models/{SMALL}/warm").status_code == 200  # in-process: always warm
    missing = fast.admin.post("/admin/v1/models/hf:nobody/none/warm")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_client_leaving_during_the_cold_start_is_never_admitted(slow: ColdGateway) -> None:
    _, key = slow.new_key()

    def leave_early() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{slow.base_url}/v1/chat/completions", json=chat_body(LARGE),
                       headers={"authorization": f"Bearer {key}"}, timeout=0.5)

    leaver = threading.Thread(target=leave_early)
    leaver.start()
    wait_until(lambda: slow.stats()["cold_starts_waiting"] == 1)
    leaver.join(timeout=5)
    wait_until(lambda: slow.stats()["cold_starts_waiting"] == 0)
    slow.release()
    assert slow.stats()["in_flight"] == 0
    assert slow.quotas(key)["rollingFiveHourLimit"]["remaining"] == FULL_BAR


async def test_sim_start_is_paid_once_and_generate_waits_for_it() -> None:
    engine = SimulatedEngine(start_s=0.2)
    request = GenerationRequest(request_id="r", model=LARGE, sampling=SamplingParams(max_tokens=2), prompt="hi")

    async def first_chunk() -> GenerationChunk:
        async for chunk in engine.generate(request):
            return chunk
        raise AssertionError("no chunk")

    started = time.monotonic()
    await asyncio.gather(engine.start(), first_chunk(), first_chunk())
    assert 0.2 <= time.monotonic() - started < 0.4  # concurrent callers share one load
    started = time.monotonic()
    await first_chunk()
    assert time.monotonic() - started < 0.05
