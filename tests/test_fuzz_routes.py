"""Property-based fuzzing of every public route, generated from the gateway's own OpenAPI schema.

The schema comes from the real app in-process (`app.openapi()`): the gateway
does not serve it (openapi_url=None) because SPEC is the contract operators
and SDKs rely on, and a served schema would only describe a raw `Request` per
route. Every path and method in it is fuzzed, grouped by API surface, so a
route added later (the Responses API, say) is fuzzed the day it appears. Its
request body is generated from its pydantic model when `BODY_MODELS` names
one, and as arbitrary JSON otherwise.

Each surface gets `FUZZ_EXAMPLES` generated requests (1,000 in CI;
derandomized and without an example database, so every run sends the same
requests). For each: never a 5xx, every error in its API's own shape, and a
refused (or free) request moves neither bar nor the usage ledger.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_apps.engines.sim import SIM_EMBED, SIM_LARGE, SIM_SMALL
from serve_apps.protocols.anthropic_models import CountTokensRequest, MessagesRequest
from serve_apps.protocols.openai_models import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest
from tests.fuzz_schema import HOSTILE_STRINGS, SchemaStrategies, any_json
from tests.inprocess_gateway import ADMIN_TOKEN, InProcessGateway

FUZZ_EXAMPLES = int(os.environ.get("PACKSERVE_FUZZ_EXAMPLES", "1000"))
FIXED_NOW_MS = 1_800_000_000_000  # a fixed clock: bars never recharge, so any movement is a charge

# Request bodies by path suffix (the same model under /v1, /openai/v1 and /anthropic/v1).
BODY_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "/chat/completions": ChatCompletionRequest,
    "/completions": CompletionRequest,
    "/embeddings": EmbeddingsRequest,
    "/messages": MessagesRequest,
    "/messages/count_tokens": CountTokensRequest,
}
# Free routes: authenticated or not, they never charge.
METERED_SUFFIXES = ("/chat/completions", "/completions", "/embeddings", "/messages", "/responses")
ADMIN_FIELDS = ("name", "plan", "packs", "spend_cap_usd", "concurrency", "days", "prefix")
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
                         suppress_health_check=list(HealthCheck))


@dataclass(frozen=True, eq=False)
class Operation:
    method: str
    path: str
    params: tuple[dict[str, Any], ...]

    @property
    def surface(self) -> str:
        return surface_of(self.path)

    @property
    def metered(self) -> bool:
        return self.method == "POST" and self.path.endswith(METERED_SUFFIXES) and self.surface != "admin"


def surface_of(path: str) -> str:
    if path.startswith("/admin/"):
        return "admin"
    if path.startswith("/anthropic/") or "/messages" in path:
        return "anthropic"
    if path.startswith(("/v1/", "/openai/")):
        return "openai"
    return "v2"  # /v2 and the gateway's own pages: /health, /metrics, /dashboard


def is_anthropic_error_path(path: str) -> bool:
    return path.startswith("/anthropic/") or path.endswith(("/messages", "/messages/count_tokens"))


@dataclass
class World:
    gw: InProcessGateway
    operations: list[Operation]
    account_id: str  # the metered account whose bars and ledger are watched
    key: str
    victim_account: str  # what the admin fuzz may change or delete
    victim_key_id: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    gw = InProcessGateway(tmp_path_factory.mktemp("fuzz"), clock=lambda: FIXED_NOW_MS,
                          gateway={"auth_failures_per_minute": 1_000_000})
    try:
        schema = gw.app.openapi()
        ops = [Operation(method.upper(), path, tuple(op.get("parameters", ())))
               for path, item in schema["paths"].items() for method, op in item.items()]
        account_id, key = gw.new_key(["founder"] * 5)
        victim, _ = gw.new_key()
        keys = gw.admin("GET", f"/accounts/{victim}/keys").json()["data"]
        yield World(gw, ops, account_id, key, victim, str(keys[0]["id"]))
    finally:
        gw.close()


@pytest.mark.slow
def test_every_surface_has_routes(world: World) -> None:
    surfaces = {op.surface for op in world.operations}
    assert surfaces == {"openai", "anthropic", "v2", "admin"}
    assert any(op.path == "/v1/chat/completions" for op in world.operations)
    assert any(op.path == "/v1/messages" for op in world.operations)


# -- request generation -------------------------------------------------------------


def _path_value(name: str, world: World, surface: str) -> st.SearchStrategy[str]:
    known = [SIM_LARGE, SIM_SMALL, SIM_EMBED, "hf:nope/none"]
    if surface == "admin":
        known += [world.victim_account, world.victim_key_id, "acct_0000000000000000"]
    return st.one_of(st.sampled_from(known), st.text(max_size=30), st.sampled_from(HOSTILE_STRINGS))


def _query(op: Operation) -> st.SearchStrategy[dict[str, Any]]:
    fields = {p["name"]: st.one_of(st.integers(-10, 5000), st.text(max_size=10), st.sampled_from(HOSTILE_STRINGS))
              for p in op.params if p.get("in") == "query"}
    return st.fixed_dictionaries({}, optional=fields)


@functools.cache
def _body(op: Operation) -> st.SearchStrategy[Any]:
    for suffix, model in BODY_MODELS.items():
        if op.path.endswith(suffix) and op.surface != "admin":
            return SchemaStrategies(model.model_json_schema()).body()
    fields = ADMIN_FIELDS if op.surface == "admin" else ("model", "input", "messages", "stream", "max_tokens")
    return st.one_of(st.dictionaries(st.sampled_from(fields), any_json, max_size=5), any_json)


def _encoded(body: Any) -> st.SearchStrategy[tuple[bytes, str]]:
    """Mostly the body as JSON; sometimes raw bytes or another content type."""
    as_json = json.dumps(body).encode()
    return st.one_of(st.just((as_json, "application/json")), st.just((as_json, "application/json")),
                     st.binary(max_size=64).map(lambda b: (b, "application/json")),
                     st.just((as_json, "text/plain")),
                     st.just((as_json[: max(1, len(as_json) // 2)], "application/json")))


def _auth(world: World, surface: str, with_token: bool | None) -> st.SearchStrategy[dict[str, str]]:
    if surface == "admin":
        if with_token:
            return st.just({"authorization": f"Bearer {ADMIN_TOKEN}"})
        return st.sampled_from([{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {ADMIN_TOKEN}"},
                                {"authorization": f"Bearer {world.key}"}, {"x-api-key": ADMIN_TOKEN}])
    valid = [{"authorization": f"Bearer {world.key}"}, {"x-api-key": world.key},
             {"x-api-key": world.key, "anthropic-version": "2023-06-01", "anthropic-beta": "x,y"}]
    invalid = [{}, {"authorization": "Bearer ps-invented"}, {"x-api-key": "ps-" + "A" * 43},
               {"authorization": "Bearer"}, {"authorization": world.key}]
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(invalid))


@st.composite
def requests_for(draw: st.DrawFn, world: World, surface: str, with_token: bool | None = None) -> dict[str, Any]:
    op = draw(st.sampled_from([o for o in world.operations if o.surface == surface]))
    path = op.path
    for p in op.params:
        if p.get("in") == "path":
            value = draw(_path_value(p["name"], world, surface))
            path = path.replace("{" + p["name"] + "}", quote(value, safe="") or "x")
    req: dict[str, Any] = {"op": op, "method": op.method, "path": path, "params": draw(_query(op)),
                           "headers": dict(draw(_auth(world, surface, with_token)))}
    if op.method in ("POST", "PUT"):
        content, content_type = draw(_encoded(draw(_body(op))))
        req["content"] = content
        req["headers"]["content-type"] = content_type
    return req


# -- the properties -----------------------------------------------------------------


def assert_error_shape(path: str, status: int, response_text: str) -> None:
    body = json.loads(response_text)
    if is_anthropic_error_path(path):
        assert body["type"] == "error", body
        assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str), body
    else:
        err = body["error"]
        assert isinstance(err["message"], str) and isinstance(err["type"], str), body
        assert "code" in err and "param" in err, body
    assert "Traceback" not in response_text


def send_and_check(world: World, req: dict[str, Any]) -> None:
    op: Operation = req["op"]
    gw = world.gw
    before, events = gw.charges(world.account_id), gw.usage_events(world.account_id)
    r = gw.request(req["method"], req["path"], params=req["params"], headers=req["headers"],
                   content=req.get("content"))
    assert r.status_code < 500, (req["method"], req["path"], r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert_error_shape(req["path"], r.status_code, r.text)
    if op.surface == "admin":
        return
    after = gw.charges(world.account_id)
    if r.status_code >= 400 or not op.metered:
        assert after == before, (req["method"], req["path"], r.status_code, before, after)
    else:
        assert gw.usage_events(world.account_id) == events + 1, "a served request leaves exactly one usage event"


@pytest.mark.slow
@pytest.mark.parametrize("surface", ["openai", "anthropic", "v2"])
def test_fuzz_customer_surface(world: World, surface: str) -> None:
    sent: list[str] = []

    @FUZZ_SETTINGS
    @given(requests_for(world, surface))
    def run(req: dict[str, Any]) -> None:
        sent.append(req["path"])
        send_and_check(world, req)

    run()
    assert len(sent) >= FUZZ_EXAMPLES


@pytest.mark.slow
def test_fuzz_admin_with_token(world: World) -> None:
    sent: list[str] = []

    @FUZZ_SETTINGS
    @given(requests_for(world, "admin", with_token=True))
    def run(req: dict[str, Any]) -> None:
        sent.append(req["path"])
        send_and_check(world, req)

    run()
    assert len(sent) >= FUZZ_EXAMPLES


@pytest.mark.slow
def test_fuzz_admin_without_token_is_always_401(world: World) -> None:
    sent: list[str] = []

    @FUZZ_SETTINGS
    @given(requests_for(world, "admin", with_token=False))
    def run(req: dict[str, Any]) -> None:
        sent.append(req["path"])
        r = world.gw.request(req["method"], req["path"], params=req["params"], headers=req["headers"],
                             content=req.get("content"))
        assert r.status_code == 401, (req["method"], req["path"], r.status_code, r.text[:300])
        assert_error_shape(req["path"], r.status_code, r.text)

    run()
    assert len(sent) >= FUZZ_EXAMPLES
