"""Preemption through the gateway (scheduler.preempt, SPEC §4), with the official OpenAI SDK.

A simulated model with two sequences is held by one account's two streams;
another account, with nothing running, is served at once instead of waiting
for one of them to end: its engine pauses the younger stream, which resumes
and completes unchanged. With preemption off the same request waits.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import RedisServer
from tests.live_gateway import LiveGateway, wait_for

LARGE = "hf:packserve/sim-large"
HEAVY_TOKENS = 300


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


class HeavyStream:
    """A streamed answer of exactly HEAVY_TOKENS tokens, read to its end in a thread of its own."""

    def __init__(self, gw: LiveGateway, key: str, name: str) -> None:
        self.client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=60)
        self.name = name
        self.text = ""
        self.completion_tokens: int | None = None
        self.chunks = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model=LARGE, stream=True, max_tokens=HEAVY_TOKENS, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"write at length, {self.name}"}],
                extra_body={"ignore_eos": True})
            for chunk in stream:
                self.chunks += 1
                if chunk.choices and chunk.choices[0].delta.content:
                    self.text += chunk.choices[0].delta.content
                if chunk.usage is not None:
                    self.completion_tokens = chunk.usage.completion_tokens
        finally:
            self.done.set()


def hold_the_model(gw: LiveGateway) -> list[HeavyStream]:
    _, key = gw.new_key(plan="payg", concurrency=4)
    heavy = []
    for name in ("first", "second"):
        heavy.append(HeavyStream(gw, key, name))
        wait_for(lambda h=heavy[-1]: h.chunks >= 3, f"the {name} heavy stream to start", attempts=1000)
    return heavy


def light_request(gw: LiveGateway) -> Any:
    _, key = gw.new_key(["standard"])
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=60)
    return client.chat.completions.with_raw_response.create(
        model=LARGE, max_tokens=4, messages=[{"role": "user", "content": "a short question"}])


@pytest.mark.parametrize("preempt", [True, False], ids=["preempt", "no-preempt"])
def test_a_returning_account_is_served_at_once_and_the_paused_stream_completes(
        redis_server: RedisServer, tmp_path: Path, preempt: bool) -> None:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path, tokens_per_s=100, sim_max_seqs=2,
                     scheduler={"preempt": preempt, "poll_interval_s": 0.05}) as gw:
        heavy = hold_the_model(gw)
        raw = light_request(gw)
        assert raw.status_code == 200 and raw.parse().choices[0].message.content
        # Served while both heavy answers were still streaming (each lasts HEAVY_TOKENS / 100 s), or, without
        # preemption, only after the first of them ended.
        assert all(not h.done.is_set() for h in heavy) is preempt
        for h in heavy:
            assert h.done.wait(60)
            assert h.completion_tokens == HEAVY_TOKENS, h.name
        engine = gw.engine
        assert engine.peak_running[LARGE] == 2 and engine.running[LARGE] == 0
        assert len(engine.preempted) == (1 if preempt else 0)
        metrics = gw.admin.get("/metrics").text
        assert (f'packserve_preemptions_total{{model="{LARGE}"}} 1.0' in metrics) is preempt
        # Each answer is the one it would have been alone: the same requests again give the same texts.
        _, key = gw.new_key(plan="payg", concurrency=4)
        again = [HeavyStream(gw, key, h.name) for h in heavy]
        for h, twin in zip(heavy, again, strict=True):
            assert twin.done.wait(60)
            assert h.text == twin.text and twin.completion_tokens == HEAVY_TOKENS, h.name
        wait_for(lambda: capacity(gw) == (0, 0), "every sequence to come back", attempts=1000)


def capacity(gw: LiveGateway) -> tuple[int, int]:
    stats = gw.admin.get("/admin/v1/stats").json()
    model = next(m for m in stats["capacity"] if m["model"] == LARGE)
    return model["in_flight"], model["waiting"]
