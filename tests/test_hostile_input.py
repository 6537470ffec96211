"""Hand-written hostile requests, each answered in the API's own error shape (never a 5xx) and
charged nothing: a 100 MB body, deeply nested JSON, invalid UTF-8, absurd max_tokens, 10,000
messages, NUL bytes in a model id, CR/LF smuggled into headers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest

from serve_apps.engines.sim import SIM_LARGE
from serve_apps.gateway.body import MAX_JSON_DEPTH, json_depth
from tests.inprocess_gateway import InProcessGateway
from tests.test_fuzz_routes import assert_error_shape

NOW_MS = 1_800_000_000_000
MIB = 1024 * 1024
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessGateway]:
    g = InProcessGateway(tmp_path_factory.mktemp("hostile"), clock=lambda: NOW_MS)
    try:
        yield g
    finally:
        g.close()


@pytest.fixture(scope="module")
def account(gw: InProcessGateway) -> tuple[str, str]:
    return gw.new_key(["founder"])


def post(gw: InProcessGateway, key: str, path: str, content: bytes | AsyncIterator[bytes],
         **headers: str) -> Any:
    return gw.request("POST", path, content=content,
                      headers={"authorization": f"Bearer {key}", "content-type": "application/json", **headers})


def nested(depth: int) -> bytes:
    return b'{"model": "' + SIM_LARGE.encode() + b'", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def test_json_depth_is_measured_without_recursion() -> None:
    assert json_depth(1) == 0
    assert json_depth({"a": [1, {"b": []}]}) == 4
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == 100_001


@pytest.mark.parametrize("path", [CHAT, MESSAGES, "/v1/completions", "/v1/embeddings",
                                  "/v1/messages/count_tokens"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 100_000])
def test_deeply_nested_json_is_a_400_in_shape(gw: InProcessGateway, account: tuple[str, str], path: str,
                                             depth: int) -> None:
    before = gw.charges(account[0])
    r = post(gw, account[1], path, nested(depth))
    assert r.status_code == 400, r.text
    assert_error_shape(path, 400, r.text)
    assert "deeper than" in r.text
    assert gw.charges(account[0]) == before


def test_a_100_mb_body_is_refused_early(gw: InProcessGateway, account: tuple[str, str]) -> None:
    """Declared: refused before a byte is read. Streamed with no length: refused at the limit,
    without reading the rest (the limit is 32 MiB, so at most that much was ever buffered)."""
    declared = gw.request("POST", CHAT, content=b"{}", headers={
        "authorization": f"Bearer {account[1]}", "content-type": "application/json",
        "content-length": str(100 * MIB)})
    assert declared.status_code == 413
    assert_error_shape(CHAT, 413, declared.text)

    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b" " * MIB
        for _ in range(100):
            sent += len(chunk)
            yield chunk

    for path in (CHAT, MESSAGES):
        sent = 0
        r = post(gw, account[1], path, body())
        assert r.status_code == 413, r.text
        assert_error_shape(path, 413, r.text)
        assert sent <= gw.config.gateway.max_body_bytes + MIB, "the gateway kept reading past its limit"


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_invalid_utf8_is_a_400(gw: InProcessGateway, account: tuple[str, str], path: str) -> None:
    raw = (b'{"model": "' + SIM_LARGE.encode()
           + b'", "max_tokens": 5, "messages": [{"role": "user", "content": "\xff\xfe\xc3("}]}')
    r = post(gw, account[1], path, raw)
    assert r.status_code == 400, r.text
    assert_error_shape(path, 400, r.text)


def test_absurd_max_tokens_is_clamped_or_refused_never_a_5xx(gw: InProcessGateway,
                                                             account: tuple[str, str]) -> None:
    for path, body in ((CHAT, {"model": SIM_LARGE, "max_tokens": 10**12, "messages": [{"role": "user",
                                                                                          "content": "hi"}]}),
                       (MESSAGES, {"model": SIM_LARGE, "max_tokens": 10**12, "messages": [{"role": "user",
                                                                                              "content": "hi"}]}),
                       (CHAT, {"model": SIM_LARGE, "max_tokens": -(10**12), "messages": [{"role": "user",
                                                                                             "content": "hi"}]}),
                       (CHAT, {"model": SIM_LARGE, "max_tokens": 1e308,
                               "messages": [{"role": "user", "content": "hi"}]})):
        r = post(gw, account[1], path, json.dumps(body).encode())
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert_error_shape(path, 400, r.text)
        else:
            usage = r.json()["usage"]
            assert usage.get("completion_tokens", usage.get("output_tokens")) <= 4096


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_ten_thousand_messages(gw: InProcessGateway, account: tuple[str, str], path: str) -> None:
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": f"m{i}"} for i in range(10_000)]
    before, events = gw.charges(account[0]), gw.usage_events(account[0])
    r = post(gw, account[1], path, json.dumps({"model": SIM_LARGE, "max_tokens": 4,
                                                "messages": messages}).encode())
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_error_shape(path, 400, r.text)
        assert gw.charges(account[0]) == before
    else:
        assert gw.usage_events(account[0]) == events + 1


@pytest.mark.parametrize("path", [CHAT, MESSAGES, "/v1/embeddings"])
@pytest.mark.parametrize("model", [SIM_LARGE + "\x00", "\x00", "hf:packserve/\x00sim-large", "\x00" * 1000])
def test_nul_bytes_in_a_model_id_are_a_404(gw: InProcessGateway, account: tuple[str, str], path: str,
                                          model: str) -> None:
    before = gw.charges(account[0])
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "input": "x"}
    r = post(gw, account[1], path, json.dumps(body).encode())
    assert r.status_code == 404, r.text
    assert_error_shape(path, 404, r.text)
    assert gw.charges(account[0]) == before


async def _raw_asgi(gw: InProcessGateway, path: str, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Call the app with headers no HTTP client would send (CR/LF inside a value)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": headers, "client": ("198.51.100.4", 1234), "server": ("gw", 80)}
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gw.app(scope, cast(Any, receive), cast(Any, send))
    await gw.settled()
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], start["headers"], b"".join(m.get("body", b"") for m in sent
                                                        if m["type"] == "http.response.body")


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("name", [b"anthropic-version", b"anthropic-beta", b"x-request-id", b"x-api-key",
                                  b"x-stainless-lang", b"authorization"])
def test_header_injection_is_neither_reflected_nor_a_5xx(gw: InProcessGateway, account: tuple[str, str],
                                                        path: str, name: bytes) -> None:
    evil = b"v\r\nX-Injected: 1\r\nSet-Cookie: pwned=1"
    headers = [(b"content-type", b"application/json"), (name, evil)]
    if name not in (b"x-api-key", b"authorization"):
        headers.append((b"authorization", f"Bearer {account[1]}".encode()))
    body = json.dumps({"model": SIM_LARGE, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    status, out_headers, out = gw.run(_raw_asgi(gw, path, headers, body.encode()))
    assert status < 500, out
    names = {k.lower() for k, _ in out_headers}
    assert b"x-injected" not in names and b"set-cookie" not in names
    assert all(b"\r" not in v and b"\n" not in v for _, v in out_headers)
    assert b"pwned" not in out
    if status >= 400:
        assert_error_shape(path, status, out.decode())
