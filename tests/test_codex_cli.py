"""Codex CLI (the real one, from npm) against `packserve gateway --engine sim`, over the Responses API.

`codex exec` runs with a custom provider (`wire_api = "responses"`) whose
base URL is a recording proxy in front of a real gateway process, in a
CODEX_HOME of its own. Two turns: a plain prompt to a clean exit, and a
prompt whose `@sim-call` directive makes the simulated model call Codex's own
shell tool, which Codex runs and answers with a `function_call_output`.

What Codex sent is kept in tests/fixtures/codex/ (rewritten when
PACKSERVE_RECORD_CODEX=1 is set), and `test_recorded_codex_requests_replay`
sends those requests to a gateway and checks every event with the SDK's
types: it runs even where npm cannot be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from tests.agent_clis import agent_clis
from tests.agent_recorder import REDACTED, Recorder
from tests.gateway_process import GatewayProcess
from tests.live_gateway import LiveGateway

pytestmark = pytest.mark.npm

CODEX_VERSION = "0.171.0"
FIXTURES = Path(__file__).parent / "fixtures" / "codex"
MODEL = "hf:packserve/sim-large"
TOOL = "exec_command"  # Codex 0.171's shell tool, as its requests list it
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
CODEX_TIMEOUT_S = 180
RECORD = os.environ.get("PACKSERVE_RECORD_CODEX") == "1"


# -- the gateway process ------------------------------------------------------------------------

@dataclass
class CodexAccount:
    """The gateway process and the one account the Codex runs use."""

    gateway: GatewayProcess
    key: str
    account_id: str

    @property
    def base_url(self) -> str:
        return self.gateway.base_url

    def usage_events(self) -> list[dict[str, Any]]:
        return self.gateway.usage_events(self.account_id)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CodexAccount]:
    """`packserve gateway --engine sim` as its own process (embedded store), with one fresh account."""
    with GatewayProcess(tmp_path_factory.mktemp("codex-gw")) as gw:
        account_id, key = gw.new_key(["standard"])
        yield CodexAccount(gw, key, account_id)


# -- codex ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def codex() -> Path:
    """The `codex` executable of agents/package-lock.json (the test skips, saying why, when npm is unreachable)."""
    clis = agent_clis()
    assert clis.versions["@openai/codex"] == CODEX_VERSION, "the fixtures were recorded with another Codex"
    return clis.codex


def codex_home(root: Path, base_url: str) -> Path:
    """An isolated CODEX_HOME whose only provider is packserve, speaking the Responses API."""
    home = root / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(f"""\
model = "{MODEL}"
model_provider = "packserve"
approval_policy = "never"

[model_providers.packserve]
name = "packserve"
base_url = "{base_url}/v1"
env_key = "PACKSERVE_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0

[analytics]
enabled = false
""")
    return home


def run_codex(codex: Path, tmp: Path, base_url: str, key: str, prompt: str) -> subprocess.CompletedProcess[str]:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), "LANG": "C.UTF-8",
           "CODEX_HOME": str(codex_home(tmp, base_url)), "PACKSERVE_API_KEY": key}
    # danger-full-access: the only command the model asks for is an `echo`, and a sandbox (bubblewrap)
    # may be unavailable in the container running the tests.
    return subprocess.run([str(codex), "exec", "--strict-config", "--skip-git-repo-check", "--sandbox",
                           "danger-full-access", "--cd", str(work), prompt], env=env, cwd=work,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CODEX_TIMEOUT_S)


@dataclass
class Exchange:
    """One request Codex sent to /responses, and the event stream it got back."""

    request: dict[str, Any]
    reply: str

    @property
    def body(self) -> Any:
        return self.request["body"]


def responses_exchanges(recorder: Recorder) -> list[Exchange]:
    return [Exchange(x, reply.decode()) for x, reply in zip(recorder.exchanges, recorder.replies, strict=True)
            if x["method"] == "POST" and x["path"].endswith("/responses")]


def sse_payloads(text: str) -> list[dict[str, Any]]:
    """The JSON `data` of every event of an SSE body."""
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def check_stream(text: str) -> Response:
    """Every event parses with the SDK's types, in sequence; returns the terminal event's Response."""
    payloads = sse_payloads(text)
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    events = [EVENT.validate_python(p) for p in payloads]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    final = events[-1].response
    assert isinstance(final, Response)
    return final


def save_fixture(name: str, recorder: Recorder) -> None:
    recorder.save(FIXTURES / f"{name}.json", f"codex-cli {CODEX_VERSION}")


# -- the live client ------------------------------------------------------------------------------

def test_codex_exec_plain_prompt(codex: Path, gateway: CodexAccount, tmp_path: Path) -> None:
    with Recorder(gateway.base_url) as recorder:
        done = run_codex(codex, tmp_path, recorder.base_url, gateway.key, "Say hello to packserve.")
    assert done.returncode == 0, done.stderr[-3000:]
    [exchange] = responses_exchanges(recorder)
    assert exchange.request["status"] == 200 and exchange.request["headers"]["authorization"] == REDACTED
    body = exchange.body
    # What the issue says current Codex sends (checked, so a Codex upgrade that changes it is noticed).
    assert body["model"] == MODEL and body["stream"] is True and body["store"] is False
    assert "instructions" not in body and body["input"][0]["role"] == "developer"
    assert all(item.get("id") for item in body["input"])
    assert body["include"] == ["reasoning.encrypted_content"] and body["reasoning"] == {"summary": "auto"}
    assert {t["type"] for t in body["tools"]} >= {"function", "namespace", "web_search"}
    assert TOOL in {t.get("name") for t in body["tools"]}
    final = check_stream(exchange.reply)
    # Codex prints the model's last message as its result.
    assert final.output_text and final.output_text in done.stdout
    [event] = gateway.usage_events()[-1:]
    assert event["api"] == "responses" and event["status"] == "ok" and event["cost_pico"] > 0
    assert final.usage is not None and event["prompt_tokens"] == final.usage.input_tokens
    if RECORD:
        save_fixture("plain", recorder)


def test_codex_exec_runs_a_tool_the_model_calls(codex: Path, gateway: CodexAccount, tmp_path: Path) -> None:
    marker = f"packserve-{uuid.uuid4().hex[:8]}"
    # "think": the large simulated model reasons first, so Codex also gets (and sends back) a reasoning item.
    prompt = f"Think, then print the marker.\n@sim-call {TOOL} {json.dumps({'cmd': f'echo {marker}'})}"
    before = len(gateway.usage_events())
    with Recorder(gateway.base_url) as recorder:
        done = run_codex(codex, tmp_path, recorder.base_url, gateway.key, prompt)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = responses_exchanges(recorder)
    call_turn = check_stream(first.reply)
    reasoning, call = call_turn.output
    assert reasoning.type == "reasoning" and reasoning.summary and reasoning.summary[0].text
    assert call.type == "function_call" and call.name == TOOL
    assert json.loads(call.arguments) == {"cmd": f"echo {marker}"}
    # Codex ran it and sent the reasoning, the call and its output back, with ids, on the next turn.
    sent = second.body["input"]
    assert [i["id"] for i in sent if i.get("type") == "reasoning"] == [reasoning.id]
    echoed = [i for i in sent if i.get("type") == "function_call"]
    outputs = [i for i in sent if i.get("type") == "function_call_output"]
    assert [(i["call_id"], i["name"]) for i in echoed] == [(call.call_id, TOOL)]
    assert [i["call_id"] for i in outputs] == [call.call_id] and all(i.get("id") for i in echoed + outputs)
    assert marker in outputs[0]["output"]
    answer = check_stream(second.reply)
    assert [o.type for o in answer.output] == ["reasoning", "message"] and answer.output_text in done.stdout
    # The second turn re-reads the first from the prefix cache, and both are metered as Responses requests.
    assert answer.usage is not None and answer.usage.input_tokens_details.cached_tokens > 0
    events = gateway.usage_events()[before:]
    assert [(e["api"], e["status"]) for e in events] == [("responses", "ok"), ("responses", "ok")]
    if RECORD:
        save_fixture("tool_call", recorder)


# -- replay of what Codex sent (no npm needed) -----------------------------------------------------

def load_fixture(name: str) -> list[dict[str, Any]]:
    """The recorded requests Codex sent to /responses."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["client"] == f"codex-cli {CODEX_VERSION}"
    return [x for x in data["exchanges"] if x["method"] == "POST" and x["path"].endswith("/responses")]


@pytest.fixture(scope="module")
def replay_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveGateway, str]]:
    with LiveGateway(redis_url=None, data_dir=tmp_path_factory.mktemp("codex-replay")) as g:
        _, key = g.new_key(["standard"])
        yield g, key


def replay(gw: LiveGateway, key: str, recorded: dict[str, Any]) -> Response:
    headers = {k: v for k, v in recorded["headers"].items() if k != "authorization"}
    headers["authorization"] = f"Bearer {key}"
    with httpx.stream("POST", gw.base_url + recorded["path"], json=recorded["body"], headers=headers,
                      timeout=60) as r:
        text = r.read().decode()
    assert r.status_code == 200, text
    assert r.headers["content-type"].startswith("text/event-stream")
    return check_stream(text)


def test_recorded_codex_requests_replay(replay_gateway: tuple[LiveGateway, str]) -> None:
    gw, key = replay_gateway
    [plain] = load_fixture("plain")
    assert plain["headers"]["authorization"] == REDACTED
    answer = replay(gw, key, plain)
    assert [o.type for o in answer.output] == ["message"] and answer.output_text

    first, second = load_fixture("tool_call")
    call_turn = replay(gw, key, first)
    reasoning, call = call_turn.output
    assert reasoning.type == "reasoning"
    directive = next(line for item in first["body"]["input"] if item.get("role") == "user"
                     for part in item["content"] for line in part["text"].splitlines()
                     if line.startswith("@sim-call"))
    assert call.type == "function_call" and call.name == TOOL
    assert json.loads(call.arguments) == json.loads(directive.split(" ", 2)[2])
    # The recorded second turn carries Codex's function_call and function_call_output items; it gets words.
    kinds = [i.get("type") for i in second["body"]["input"]]
    assert {"reasoning", "function_call", "function_call_output"} <= set(kinds)
    answer = replay(gw, key, second)
    assert [o.type for o in answer.output] == ["reasoning", "message"] and answer.output_text
