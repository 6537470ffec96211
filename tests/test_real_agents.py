"""Real coding agents against a real `packserve gateway --engine sim` process.

Claude Code (`claude -p`) talks to the Anthropic API and opencode (`opencode
run`) to the OpenAI API, each twice: a plain prompt, and a prompt whose
`@sim-call` line makes the simulated model call one of the agent's own tools
(a harmless `echo`), which the agent runs and answers after. Each run must
exit 0 with its answer in its JSON output, no request may get a 4xx, and the
account's bars, read exactly from the store, must have moved by exactly what
the gateway recorded as charged.

The CLIs come from agents/package-lock.json (tests/agent_clis.py); without
npm or its registry these tests skip with the reason, and
test_recorded_agent_requests_replay_without_errors still replays the
requests the agents sent when the fixtures were recorded
(tests/fixtures/agents/, rewritten by a run with
PACKSERVE_RECORD_AGENT_FIXTURES=1).

Every agent runs with HOME, config and caches in a temporary directory, its
telemetry, update checks and other non-essential traffic off, and a time
limit; it reaches only the recording proxy in front of the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.redis_store import RedisStore
from serve_apps.config import AppConfig
from serve_apps.engines.sim import SIM_LARGE, SIM_SMALL
from tests.agent_clis import agent_clis, claude_env, isolated_env, run_agent
from tests.agent_recorder import REDACTED, Recorder
from tests.conftest import RedisServer
from tests.gateway_process import GatewayProcess
from tests.live_gateway import LiveGateway

pytestmark = pytest.mark.npm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "agents"
RECORD = os.environ.get("PACKSERVE_RECORD_AGENT_FIXTURES") == "1"
MARKER = "packserve-tool-ok"
TOOL_PROMPT = "Run the shell command that prints the marker, then report.\n@sim-call {tool} {args}"


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """`packserve gateway --engine sim` as its own process on 127.0.0.1, on the session's Redis."""
    redis_server.flushall()
    with GatewayProcess(tmp_path_factory.mktemp("agents-gateway"), redis_url=redis_server.url) as gw:
        yield gw


def bar_levels(redis_url: str | None, account_id: str) -> tuple[int, int, int, int]:
    """(request level, request capacity, weekly level, weekly capacity), exact, from the store."""
    assert redis_url is not None, "the agents' gateway runs on Redis"
    async def read() -> tuple[int, int, int, int]:
        unit = AppConfig.model_validate({}).admission.weight_policy.unit
        store = await RedisStore.connect(redis_url, request_unit=unit)
        try:
            snap = await store.snapshot(account_id)
        finally:
            await store.close()
        assert snap.request and snap.request_spec and snap.weekly and snap.weekly_spec
        return snap.request.level, snap.request_spec.capacity, snap.weekly.level, snap.weekly_spec.capacity

    return asyncio.run(read())


def generation_paths(exchanges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in exchanges if e["method"] == "POST" and
            (e["path"].endswith("/messages") or e["path"].endswith("/chat/completions"))]


def assert_charged_exactly(gateway: GatewayProcess, account_id: str, before: tuple[int, int, int, int],
                           exchanges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every generation the agent asked for was recorded, and the bars moved by exactly those charges."""
    assert all(e["status"] < 400 for e in exchanges), [(e["method"], e["path"], e["status"]) for e in exchanges]
    wanted = len(generation_paths(exchanges))
    assert wanted >= 1
    deadline = time.monotonic() + 15
    while len(events := gateway.usage_events(account_id)) < wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(events) == wanted, events
    assert all(e["status"] == "ok" for e in events), events
    unit = AppConfig.model_validate({}).admission.weight_policy.unit
    request_charge = sum(round(e["weight"] * unit) for e in events)
    weekly_charge = sum(int(e["cost_pico"]) for e in events)
    assert weekly_charge > 0
    request_level, request_cap, weekly_level, weekly_cap = bar_levels(gateway.redis_url, account_id)
    assert before == (request_cap, request_cap, weekly_cap, weekly_cap)  # a fresh account starts full
    assert (request_level, weekly_level) == (request_cap - request_charge, weekly_cap - weekly_charge)
    return events


def save_fixture(recorder: Recorder, name: str, client: str) -> None:
    if RECORD:
        recorder.save(FIXTURES / f"{name}.json", client)


# -- Claude Code ------------------------------------------------------------------------------

@pytest.mark.parametrize("with_tool", [False, True], ids=["plain", "tool"])
def test_claude_code_print_mode(gateway: GatewayProcess, tmp_path: Path, with_tool: bool) -> None:
    clis = agent_clis()
    account_id, key = gateway.new_key()
    before = bar_levels(gateway.redis_url, account_id)
    workdir = tmp_path / "project"
    workdir.mkdir()
    if with_tool:
        args = json.dumps({"command": f"echo {MARKER}", "description": "Print the marker"})
        # The prompt before --allowedTools, which takes every argument after it.
        argv = [str(clis.claude), "-p", TOOL_PROMPT.format(tool="Bash", args=args), "--output-format", "json",
                "--allowedTools", "Bash(echo:*)"]
    else:
        argv = [str(clis.claude), "-p", "Say hello", "--output-format", "json"]
    with Recorder(gateway.base_url) as recorder:
        done = run_agent(argv, claude_env(tmp_path / "home", recorder.base_url, key, SIM_LARGE, SIM_SMALL), workdir)
    assert done.returncode == 0, (done.stdout, done.stderr)
    out = json.loads(done.stdout)
    assert out["type"] == "result" and out["is_error"] is False and out["subtype"] == "success", out
    assert isinstance(out["result"], str) and out["result"]
    exchanges = recorder.exchanges
    assert all(e["headers"].get("x-api-key", REDACTED) == REDACTED for e in exchanges)
    generations = generation_paths(exchanges)
    if with_tool:
        # Two model turns: the call of Bash, then the answer after its result.
        assert out["num_turns"] == 2 and out["permission_denials"] == [], out
        results = [block for e in generations for m in e["body"]["messages"] if isinstance(m["content"], list)
                   for block in m["content"] if block.get("type") == "tool_result"]
        assert results and MARKER in json.dumps(results[-1]["content"]) and not results[-1].get("is_error")
    assert_charged_exactly(gateway, account_id, before, exchanges)
    save_fixture(recorder, f"claude-code-{'tool' if with_tool else 'plain'}", f"claude-code {clis.versions}")


# -- opencode ---------------------------------------------------------------------------------

def opencode_config(base_url: str, api: str = "openai") -> dict[str, Any]:
    """opencode's custom provider: the OpenAI-compatible AI-SDK package at `/v1`, or the Anthropic
    one at `/anthropic` (it appends `/messages` itself)."""
    models = {SIM_LARGE: {"name": "sim-large", "tool_call": True}, SIM_SMALL: {"name": "sim-small", "tool_call": True}}
    npm, url = ("@ai-sdk/openai-compatible", f"{base_url}/v1") if api == "openai" else \
        ("@ai-sdk/anthropic", f"{base_url}/anthropic")
    return {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        "provider": {"packserve": {"npm": npm, "name": "packserve",
                                   "options": {"baseURL": url, "apiKey": "{env:PACKSERVE_API_KEY}"},
                                   "models": models}},
        "model": f"packserve/{SIM_LARGE}",
        "small_model": f"packserve/{SIM_SMALL}",
        "permission": {"bash": "allow"},
    }


@pytest.mark.parametrize(("api", "with_tool"), [("openai", False), ("openai", True), ("anthropic", True)],
                         ids=["openai-plain", "openai-tool", "anthropic-tool"])
def test_opencode_run(gateway: GatewayProcess, tmp_path: Path, api: str, with_tool: bool) -> None:
    clis = agent_clis()
    account_id, key = gateway.new_key()
    before = bar_levels(gateway.redis_url, account_id)
    workdir = tmp_path / "project"
    workdir.mkdir()
    if with_tool:
        args = json.dumps({"command": f"echo {MARKER}", "description": "Print the marker"})
        prompt = TOOL_PROMPT.format(tool="bash", args=args)
    else:
        prompt = "Say hello"
    with Recorder(gateway.base_url) as recorder:
        (workdir / "opencode.json").write_text(json.dumps(opencode_config(recorder.base_url, api), indent=1))
        env = isolated_env(tmp_path / "home", PACKSERVE_API_KEY=key, OPENCODE_DISABLE_AUTOUPDATE="1",
                           OPENCODE_DISABLE_MODELS_FETCH="1", OPENCODE_DISABLE_SHARE="1")
        # On stdin: `opencode run` quotes a message argument that has spaces (JSON-style), which
        # would hide the directive line from the simulated model.
        done = run_agent([str(clis.opencode), "run", "--format", "json"], env, workdir, stdin=prompt)
    assert done.returncode == 0, (done.stdout, done.stderr)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip().startswith("{")]
    texts = [e["part"]["text"] for e in events if e.get("type") == "text"]
    assert texts and texts[-1], events
    assert not [e for e in events if e.get("type") == "error"], events
    if api == "anthropic":
        assert {e["path"] for e in recorder.exchanges} == {"/anthropic/messages"}
    if with_tool:
        tools = [e["part"] for e in events if e.get("type") == "tool_use"]
        assert [t["tool"] for t in tools] == ["bash"], events
        assert tools[0]["state"]["status"] == "completed" and MARKER in tools[0]["state"]["output"]
    assert_charged_exactly(gateway, account_id, before, recorder.exchanges)
    save_fixture(recorder, f"opencode-{api}-{'tool' if with_tool else 'plain'}", f"opencode {clis.versions}")


# -- replay of what the agents sent ---------------------------------------------------------------

def fixture_files() -> list[Path]:
    return sorted(FIXTURES.glob("*.json"))


@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: p.stem)
def test_recorded_agent_requests_replay_without_errors(redis_url: str, tmp_path: Path, path: Path) -> None:
    """Each request a real agent sent (headers, query and body as sent; a fresh key) still gets a 2xx."""
    recorded = json.loads(path.read_text())["exchanges"]
    assert recorded
    with LiveGateway(redis_url=redis_url, data_dir=tmp_path) as gw:
        _, key = gw.new_key(["standard"])
        with httpx.Client(base_url=gw.base_url, timeout=60) as client:
            for e in recorded:
                headers = {k: (key if v == REDACTED and k.lower() == "x-api-key"
                               else f"Bearer {key}" if v == REDACTED else v) for k, v in e["headers"].items()}
                content = json.dumps(e["body"]).encode() if e["body"] is not None else None
                reply = client.request(e["method"], e["path"] + (f"?{e['query']}" if e["query"] else ""),
                                       headers=headers, content=content)
                reply.read()
                assert reply.status_code < 400, (e["method"], e["path"], reply.status_code, reply.text[:500])
