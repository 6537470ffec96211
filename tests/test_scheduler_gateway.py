"""The capacity scheduler through the gateway, with the official SDKs (SPEC §1 admission, §4).

A simulated model with one sequence (`sim.max_seqs: 1`) is held by a long
stream; another account's request then waits for it, and past the wait bound
is refused in each API's overload shape (OpenAI 503 + Retry-After, Anthropic
529 overloaded_error) and charged nothing. Waits are bounded by parameters
(the capacity wait bound, the poll interval), never slept past.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import RedisServer
from tests.live_gateway import LiveGateway, wait_for

LARGE = "hf:packserve/sim-large"
WAIT_BOUND_S = 0.3


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path_factory.mktemp("gw-sched"), tokens_per_s=50,
                     sim_max_seqs=1, scheduler={"queue_timeout_s": WAIT_BOUND_S, "poll_interval_s": 0.05}) as g:
        yield g


class Holder:
    """A long stream that holds the model's only sequence until closed."""

    def __init__(self, gw: LiveGateway) -> None:
        self.account_id, key = gw.new_key(["standard"])
        self._client = httpx.Client(base_url=gw.base_url, timeout=30, headers={"authorization": f"Bearer {key}"})
        body = {"model": LARGE, "stream": True, "max_tokens": 2000, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hold the model"}]}
        self._stream = self._client.stream("POST", "/v1/chat/completions", json=body)
        self.response = self._stream.__enter__()
        # The gateway answers once the first chunk is out: the sequence is held from here on.
        assert self.response.status_code == 200, self.response.read()

    def close(self) -> None:
        self._stream.__exit__(None, None, None)
        self._client.close()


@pytest.fixture
def holder(gw: LiveGateway) -> Iterator[Holder]:
    h = Holder(gw)
    yield h
    h.close()
    wait_for(lambda: capacity(gw)["in_flight"] == 0, "the held sequence to come back")


def capacity(gw: LiveGateway) -> dict[str, Any]:
    stats = gw.admin.get("/admin/v1/stats").json()
    return next(m for m in stats["capacity"] if m["model"] == LARGE)


def raw_request(gw: LiveGateway, key: str) -> socket.socket:
    """A short chat request on a raw socket: the test decides exactly when the client hangs up."""
    body = json.dumps({"model": LARGE, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                  f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(body)}\r\n\r\n{body}").encode())
    return sock


def charged_nothing(gw: LiveGateway, account_id: str, key: str) -> None:
    assert gw.quotas(key)["rollingFiveHourLimit"]["remaining"] == 500
    assert gw.quotas(key)["weeklyTokenLimit"]["remainingCredits"] == "$24.00"
    events = gw.usage_events(account_id)
    assert [(e["status"], e["cost_pico"], e["weight"]) for e in events] == [("refunded", 0, 0)]


def test_openai_overload_is_a_503_with_retry_after_and_charges_nothing(gw: LiveGateway, holder: Holder) -> None:
    account_id, key = gw.new_key(["standard"])
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=30)
    with pytest.raises(openai.InternalServerError) as refused:
        client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    err = refused.value
    assert err.status_code == 503
    assert err.code == "overloaded" and "not charged" in err.message
    assert int(err.response.headers["retry-after"]) >= 1
    assert int(err.response.headers["x-packserve-queue-ms"]) >= 0
    charged_nothing(gw, account_id, key)
    assert capacity(gw)["waiting"] == 0


def test_anthropic_overload_is_a_529_overloaded_error_and_charges_nothing(gw: LiveGateway, holder: Holder) -> None:
    account_id, key = gw.new_key(["standard"])
    client = anthropic.Anthropic(base_url=f"{gw.base_url}/anthropic", api_key=key, max_retries=0, timeout=30)
    with pytest.raises(anthropic.InternalServerError) as refused:
        client.messages.create(model=LARGE, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    err = refused.value
    assert err.status_code == 529
    assert isinstance(err.body, dict) and err.body["error"]["type"] == "overloaded_error"
    assert int(err.response.headers["retry-after"]) >= 1
    charged_nothing(gw, account_id, key)


def test_a_client_that_hangs_up_while_waiting_leaves_the_queue_uncharged(redis_server: RedisServer,
                                                                         tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path, tokens_per_s=50, sim_max_seqs=1,
                     scheduler={"queue_timeout_s": 30, "poll_interval_s": 0.05}) as g:
        holder = Holder(g)
        try:
            account_id, key = g.new_key(["standard"])
            sock = raw_request(g, key)
            wait_for(lambda: capacity(g)["waiting"] == 1, "the request to wait for the model")
            assert g.quotas(key)["rollingFiveHourLimit"]["remaining"] == 499  # admitted: charged while it waits
            sock.close()  # hang up
            wait_for(lambda: capacity(g)["waiting"] == 0, "the hung-up request to leave the queue")
            wait_for(lambda: g.quotas(key)["rollingFiveHourLimit"]["remaining"] == 500, "the refund")
            assert capacity(g)["in_flight"] == 1  # the holder still runs: the leaver was never dispatched
            assert [e["status"] for e in g.usage_events(account_id)] == ["refunded"]
        finally:
            holder.close()


def test_a_waiting_request_is_checkpointed_so_a_dead_gateway_still_leaves_its_record(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """While it waits for capacity the request is checkpointed with nothing generated: were this gateway
    killed, another one's sweep would settle it (refunded, with a usage record). Its own end drops it."""
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path, tokens_per_s=50, sim_max_seqs=1,
                     scheduler={"queue_timeout_s": 30, "poll_interval_s": 0.05}) as g:
        assert g.runtime is not None
        store = g.runtime.store
        far_future_ms = 2**52  # every checkpoint is due by then

        def owed(account_id: str) -> list[Any]:
            return [s for s in g.run(store.due_checkpoints(far_future_ms, limit=1000))
                    if s.event.account_id == account_id]

        holder = Holder(g)
        try:
            account_id, key = g.new_key(["standard"])
            sock = raw_request(g, key)
            wait_for(lambda: capacity(g)["waiting"] == 1, "the request to wait for the model")
            wait_for(lambda: len(owed(account_id)) == 1, "the waiting request's checkpoint")
            [settlement] = owed(account_id)
            event = settlement.event
            assert (event.prompt_tokens, event.completion_tokens, event.status) == (0, 0, "interrupted")
            sock.close()
            wait_for(lambda: g.quotas(key)["rollingFiveHourLimit"]["remaining"] == 500, "the refund")
            wait_for(lambda: owed(account_id) == [], "the checkpoint to be dropped at settlement")
        finally:
            holder.close()


def test_queue_time_header_stats_and_metrics(redis_server: RedisServer, tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path, tokens_per_s=100, sim_max_seqs=1,
                     scheduler={"queue_timeout_s": 30, "poll_interval_s": 0.05, "charge_interval_s": 0.05}) as g:
        account_id, key = g.new_key(["standard", "standard"])
        client = openai.OpenAI(base_url=f"{g.base_url}/v1", api_key=key, max_retries=0, timeout=30)
        raw = client.chat.completions.with_raw_response.create(
            model=LARGE, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert int(raw.headers["x-packserve-queue-ms"]) >= 0  # on every metered response
        # Exact lengths through vLLM's sampling extras (extra_body), so a benchmark can ask for them.
        exact = client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=64, extra_body={"ignore_eos": True})
        assert exact.usage is not None and exact.usage.completion_tokens == 64
        assert exact.choices[0].finish_reason == "length"
        at_least = client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=100, extra_body={"min_tokens": 60})
        assert at_least.usage is not None and at_least.usage.completion_tokens >= 60
        holder = Holder(g)
        try:
            result: dict[str, Any] = {}

            def queued() -> None:
                result["raw"] = client.chat.completions.with_raw_response.create(
                    model=LARGE, messages=[{"role": "user", "content": "after you"}], max_tokens=4)

            thread = threading.Thread(target=queued)
            thread.start()
            wait_for(lambda: capacity(g)["waiting"] == 1, "the second request to wait")
            stats = capacity(g)
            assert (stats["capacity"], stats["in_flight"], stats["waiting"]) == (1, 1, 1)
            top = {a["account_id"]: a for a in stats["top_accounts"]}
            assert top[account_id]["waiting"] == 1
            # The holder's counter grows at its renewals while it streams, not only when it ends.
            def holder_counter() -> int:
                return int(next(a["counter"] for a in capacity(g)["top_accounts"]
                                if a["account_id"] == holder.account_id))

            at_start = holder_counter()
            wait_for(lambda: holder_counter() > at_start, "the streaming account's counter to grow")
            metrics = httpx.get(f"{g.base_url}/metrics").text
            assert f'packserve_model_capacity{{model="{LARGE}"}} 1.0' in metrics
            assert f'packserve_model_waiting{{model="{LARGE}"}} 1.0' in metrics
        finally:
            holder.close()
        thread.join(30)
        # It waited for the holder's stream to end: a real wait, reported in the header.
        assert int(result["raw"].headers["x-packserve-queue-ms"]) > 0
        metrics = httpx.get(f"{g.base_url}/metrics").text
        assert 'packserve_capacity_wait_seconds_count{model="hf:packserve/sim-large",outcome="dispatched"}' in metrics
