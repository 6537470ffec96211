"""The Ray Serve application end to end: real Ray, the sim engine, the session Redis.

The session's local Ray instance (2 CPUs, no dashboard; conftest `ray_serve`)
runs `build_app` for this module; every request goes through Ray Serve's
HTTP proxy to the gateway deployment and from there through
DeploymentHandles to the model deployments, driven by the official `openai` and `anthropic` SDKs. Each test
makes its own account, so tests never share bars.

The admission reference price is $0.10/M here (not $3.40), so sim-large
weighs 34 requests and a standard pack's 500-request bar empties after 14
requests instead of 500.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from ray import serve

from serve_apps.config import AppConfig
from serve_apps.deploy.ray_app import APP_NAME, build_app, dry_run
from serve_apps.engines.sim import SimulatedEngine
from serve_apps.engines.types import ChatMessage, GenerationRequest, SamplingParams
from tests.conftest import RayServe, RedisServer, call_model

pytestmark = pytest.mark.ray

ADMIN_TOKEN = "ray-test-admin-token"
LARGE = "hf:packserve/sim-large"
SMALL = "hf:packserve/sim-small"
EMBED = "hf:packserve/sim-embed"
REQUESTS_PER_STANDARD_PACK = 500
LARGE_WEIGHT = 34  # $3.40 output / $0.10 reference


@dataclass
class RayApp:
    base_url: str
    admin: httpx.Client

    def new_key(self, packs: list[str] | None = None) -> tuple[str, str]:
        r = self.admin.post("/admin/v1/accounts",
                            json={"name": "ray-test", "plan": "subscription", "packs": packs or ["standard"]})
        assert r.status_code == 201, r.text
        account = r.json()["id"]
        r = self.admin.post(f"/admin/v1/accounts/{account}/keys")
        assert r.status_code == 201, r.text
        return str(account), str(r.json()["key"])

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=30)

    def anthropic(self, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=f"{self.base_url}/anthropic", api_key=key, max_retries=0, timeout=30)


def app_config(redis_url: str, data_dir: Path) -> AppConfig:
    return AppConfig.model_validate({
        "engine": "sim",
        "store": {"redis_url": redis_url, "data_dir": str(data_dir)},
        "admission": {"queue_timeout_s": 0, "reference_price": "0.10"},
        "gateway": {"num_cpus": 0.5},
        # Slow enough that a stream is still running when the client hangs up.
        "sim": {"tokens_per_s": 20},
    })


@pytest.fixture(scope="module")
def ray_app(ray_serve: RayServe, redis_server: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayApp]:
    """This module's application on the session Ray (conftest `ray_serve`), deleted when the module ends."""
    try:
        config = app_config(redis_server.url, tmp_path_factory.mktemp("ray-app"))
        serve.run(build_app(config, admin_token=ADMIN_TOKEN), name=APP_NAME, route_prefix="/", blocking=False)
        base = ray_serve.base_url
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as admin:
            yield RayApp(base, admin)
    finally:
        serve.delete(APP_NAME)


def long_prompt(model: str, min_tokens: int = 40) -> str:
    """A prompt the deterministic sim answers at length (≥ 2 s at 20 tokens/s), found by asking it locally."""
    engine = SimulatedEngine()

    async def tokens(text: str) -> int:
        request = GenerationRequest(request_id="probe", model=model, sampling=SamplingParams(max_tokens=1000),
                                    messages=(ChatMessage("user", text),))
        usage = None
        async for chunk in engine.generate(request):
            usage = chunk.usage or usage
        return usage.completion_tokens if usage else 0

    for i in range(500):
        text = f"write a long story, take {i}"
        if asyncio.run(tokens(text)) >= min_tokens:
            return text
    raise AssertionError("no long prompt found")


def first_data_line(lines: Iterator[str]) -> str:
    """The first SSE data line, leaving `lines` open.

    The caller must keep `lines` referenced: a dropped httpx line iterator is
    finalized and closes the connection, which is itself a client disconnect.
    """
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("stream ended without a data line")


def model_stats(model_id: str) -> dict[str, Any]:
    return dict(call_model(model_id, "stats", APP_NAME, timeout_s=10))


# -- the graph --------------------------------------------------------------------------------

def test_graph_has_gateway_and_one_deployment_per_model(ray_app: RayApp) -> None:
    graph = dry_run(app_config("redis://unused", Path("/tmp")))
    assert [d["name"] for d in graph] == ["gateway", "model-packserve--sim-large", "model-packserve--sim-small",
                                          "model-packserve--sim-embed"]
    status = serve.status().applications[APP_NAME]
    assert status.status == "RUNNING"
    assert set(status.deployments) == {d["name"] for d in graph}


# -- the APIs through Ray Serve ---------------------------------------------------------------

def test_openai_chat(ray_app: RayApp) -> None:
    _, key = ray_app.new_key()
    reply = ray_app.openai(key).chat.completions.create(
        model=LARGE, messages=[{"role": "user", "content": "hello"}], max_tokens=5, seed=1)
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 5
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


def test_openai_streaming_with_usage(ray_app: RayApp) -> None:
    _, key = ray_app.new_key()
    stream = ray_app.openai(key).chat.completions.create(
        model=SMALL, messages=[{"role": "user", "content": "stream please"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    text = ""
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    assert text
    assert usage is not None and 0 < usage.completion_tokens <= 6


def test_anthropic_messages_and_stream(ray_app: RayApp) -> None:
    _, key = ray_app.new_key()
    client = ray_app.anthropic(key)
    message = client.messages.create(model=SMALL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert message.content and message.content[0].type == "text"
    assert message.usage.output_tokens > 0
    events = []
    with client.messages.stream(model=SMALL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
        for event in s:
            events.append(event.type)
        final = s.get_final_message()
    assert events[0] == "message_start" and "content_block_delta" in events and events[-1] == "message_stop"
    assert final.usage.output_tokens > 0
    counted = client.messages.count_tokens(model=SMALL, messages=[{"role": "user", "content": "count me"}])
    assert counted.input_tokens > 0


def test_embeddings(ray_app: RayApp) -> None:
    _, key = ray_app.new_key()
    result = ray_app.openai(key).embeddings.create(model=EMBED, input=["one", "two"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 64
    assert result.data[0].embedding != result.data[1].embedding


# -- limits -----------------------------------------------------------------------------------

def test_429_when_the_request_bar_is_empty(ray_app: RayApp) -> None:
    _, key = ray_app.new_key()
    client = ray_app.openai(key)
    fits = REQUESTS_PER_STANDARD_PACK // LARGE_WEIGHT
    for _ in range(fits):
        client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert refused.value.status_code == 429
    body = refused.value.response.json()
    assert body["error"]["code"] == "request_bar_empty"
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 180


def test_429_when_the_concurrency_slot_is_taken(ray_app: RayApp) -> None:
    """queue_timeout_s is 0: a second stream on a standard model is refused while the first runs."""
    _, key = ray_app.new_key()
    body = {"model": LARGE, "stream": True, "max_tokens": 1000,
            "messages": [{"role": "user", "content": long_prompt(LARGE)}]}
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{ray_app.base_url}/v1/chat/completions", json=body,
                                                 headers={"authorization": f"Bearer {key}"}) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        first_data_line(lines)
        with pytest.raises(openai.RateLimitError) as refused:
            ray_app.openai(key).chat.completions.create(
                model=LARGE, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert refused.value.response.json()["error"]["code"] == "concurrency_limit"


# -- disconnects ------------------------------------------------------------------------------

def test_client_disconnect_aborts_generation_in_the_model_deployment(ray_app: RayApp) -> None:
    _, key = ray_app.new_key()
    body = {"model": LARGE, "stream": True, "max_tokens": 1000,
            "messages": [{"role": "user", "content": long_prompt(LARGE)}]}
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{ray_app.base_url}/v1/chat/completions", json=body,
                                                 headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = first_data_line(lines)
        request_id = json.loads(first.removeprefix("data: "))["id"]
        running = model_stats(LARGE)
        assert request_id in running["in_flight"], running
    # Leaving the `with` closed the connection mid-stream.
    deadline = time.monotonic() + 10
    stats = model_stats(LARGE)
    while request_id not in stats["aborted"] and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = model_stats(LARGE)
    assert request_id in stats["aborted"]
    assert request_id not in stats["in_flight"]
    # The slot came back: the same account (concurrency 1, no queue) is admitted again.
    # Settlement runs in its own task right after the abort: allow it a moment.
    deadline = time.monotonic() + 5
    while True:
        try:
            reply = ray_app.openai(key).chat.completions.create(
                model=LARGE, messages=[{"role": "user", "content": "again"}], max_tokens=1)
            break
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert reply.choices[0].message.content is not None


def test_the_http_port_is_served_by_this_nodes_haproxy(ray_app: RayApp) -> None:
    """Ray Serve's HAProxy ingress is on (ray_env), and `ray_env.stop_haproxy` can find it by node id."""
    import ray

    from serve_apps.deploy import ray_env

    node_id = ray.get_runtime_context().get_node_id()
    assert ray_env.haproxy_pids(node_id), "no HAProxy for this Ray node: is RAY_SERVE_ENABLE_HA_PROXY set?"
    assert httpx.get(f"{ray_app.base_url}/health", timeout=10).status_code == 200
