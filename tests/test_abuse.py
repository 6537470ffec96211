"""Abuse and isolation: a key-guessing address is refused (counted across gateways on Redis) while
valid keys are served; one account's key never reads, changes or is billed for another's data;
admin paths without the token are 401 whatever the path; secrets are compared in constant time;
the dashboard sends a strict Content-Security-Policy and nobody gets a CORS header."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster import accounts as accounts_module
from serve_apps.engines.sim import SIM_EMBED, SIM_LARGE
from serve_apps.gateway import admin_routes
from serve_apps.gateway.page_headers import inline_hashes
from tests.inprocess_gateway import ADMIN_TOKEN, InProcessGateway
from tests.test_fuzz_routes import assert_error_shape

NOW_MS = 1_800_000_000_000
LIMIT = 5
CHAT = {"model": SIM_LARGE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": SIM_LARGE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


class Clock:
    def __init__(self) -> None:
        self.now = NOW_MS

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gw(tmp_path: Path, clock: Clock) -> Iterator[InProcessGateway]:
    g = InProcessGateway(tmp_path, clock=clock, gateway={"auth_failures_per_minute": LIMIT})
    try:
        yield g
    finally:
        g.close()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- invalid-key limiter --------------------------------------------------------------


def test_invalid_keys_from_one_address_are_refused_past_the_limit(gw: InProcessGateway, clock: Clock) -> None:
    account_id, key = gw.new_key()
    guesses = [gw.request("POST", "/v1/chat/completions", json=CHAT, headers=bearer(f"ps-guess{i}"),
                          host="198.51.100.66").status_code for i in range(LIMIT + 3)]
    assert guesses == [401] * LIMIT + [429] * 3
    refused = gw.request("POST", "/v1/messages", json=MESSAGE, headers={"x-api-key": "ps-guess"},
                         host="198.51.100.66")
    assert refused.status_code == 429
    assert_error_shape("/v1/messages", 429, refused.text)
    assert 0 < int(refused.headers["retry-after"]) <= 60
    openai_refused = gw.request("GET", "/v1/models", headers=bearer("ps-guess"), host="198.51.100.66")
    assert openai_refused.status_code == 429
    assert openai_refused.json()["error"]["code"] == "too_many_auth_failures"
    # A valid key is served even from that address, and is never counted.
    ok = gw.request("POST", "/v1/chat/completions", json=CHAT, headers=bearer(key), host="198.51.100.66")
    assert ok.status_code == 200, ok.text
    # Another address is untouched.
    assert gw.request("GET", "/v2/quotas", headers=bearer("ps-x"), host="198.51.100.67").status_code == 401
    # The next minute starts afresh.
    clock.now += 60_000
    assert gw.request("GET", "/v2/quotas", headers=bearer("ps-x"), host="198.51.100.66").status_code == 401
    assert gw.charges(account_id)[2] == 1


def test_the_limit_is_shared_by_gateways_on_one_redis(tmp_path: Path, redis_url: str, clock: Clock) -> None:
    a = InProcessGateway(tmp_path / "a", redis_url=redis_url, clock=clock,
                         gateway={"auth_failures_per_minute": LIMIT})
    b = InProcessGateway(tmp_path / "b", redis_url=redis_url, clock=clock,
                         gateway={"auth_failures_per_minute": LIMIT})
    try:
        codes = [g.request("GET", "/v1/models", headers=bearer("ps-guess"), host="192.0.2.10").status_code
                 for g in (a, b) * 3]
        assert codes == [401] * LIMIT + [429]
    finally:
        a.close()
        b.close()


# -- isolation -------------------------------------------------------------------------


def test_a_key_never_reaches_another_accounts_data(gw: InProcessGateway) -> None:
    mine, my_key = gw.new_key()
    theirs, their_key = gw.new_key()
    assert gw.request("POST", "/v1/chat/completions", json=CHAT, headers=bearer(their_key)).status_code == 200
    their_keys = gw.admin("GET", f"/accounts/{theirs}/keys").json()["data"]
    their_before = gw.charges(theirs)
    their_account = gw.admin("GET", f"/accounts/{theirs}").json()

    # Every admin route, with their id, called with my customer key: 401, nothing changed.
    for method, path, body in [
        ("GET", f"/admin/v1/accounts/{theirs}", None),
        ("PUT", f"/admin/v1/accounts/{theirs}/packs", {"packs": ["founder"] * 5}),
        ("POST", f"/admin/v1/accounts/{theirs}/suspend", None),
        ("POST", f"/admin/v1/accounts/{theirs}/resume", None),
        ("DELETE", f"/admin/v1/accounts/{theirs}", None),
        ("POST", f"/admin/v1/accounts/{theirs}/keys", None),
        ("GET", f"/admin/v1/accounts/{theirs}/keys", None),
        ("DELETE", f"/admin/v1/keys/{their_keys[0]['id']}", None),
        ("GET", f"/admin/v1/accounts/{theirs}/usage", None),
        ("GET", f"/admin/v1/accounts/{theirs}/usage/export", None),
        ("GET", f"/admin/v1/accounts/{theirs}/quota", None),
        ("GET", "/admin/v1/accounts", None),
    ]:
        for headers in (bearer(my_key), {"x-api-key": my_key}):
            r = gw.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, r.status_code)

    # Customer routes answer for the caller's own account, whatever id the body names.
    customer: list[tuple[str, dict[str, Any]]] = [
                       ("/v1/chat/completions", {**CHAT, "user": theirs}),
                       ("/v1/messages", {**MESSAGE, "metadata": {"user_id": theirs}}),
                       ("/v1/embeddings", {"model": SIM_EMBED, "input": "x", "user": theirs})]
    for path, customer_body in customer:
        assert gw.request("POST", path, json=customer_body, headers=bearer(my_key)).status_code == 200
    # Two keys in one request: exactly one account is billed, once (x-api-key wins).
    both = gw.request("POST", "/v1/messages", json=MESSAGE, headers={"x-api-key": my_key, **bearer(their_key)})
    assert both.status_code == 200
    usage = gw.request("GET", "/v2/usage", headers=bearer(my_key)).json()
    assert theirs not in str(usage)
    quotas = gw.request("GET", "/v2/quotas", headers=bearer(my_key)).json()
    assert theirs not in str(quotas)

    assert gw.charges(theirs) == their_before
    assert gw.admin("GET", f"/accounts/{theirs}").json() == their_account
    assert gw.admin("GET", f"/accounts/{theirs}/keys").json()["data"] == their_keys
    assert gw.usage_events(mine) == 4


# -- admin token -------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/admin"), ("GET", "/admin/"), ("GET", "/admin/v1"), ("GET", "/admin/v1/"),
    ("GET", "/admin/v1/nope"), ("GET", "/admin/v2/accounts"), ("PATCH", "/admin/v1/accounts"),
    ("POST", "/admin/v1/stats"), ("GET", "/admin/v1/accounts/x/usage?days=abc"),
    ("GET", "/admin/v1/accounts/%0A/keys"), ("DELETE", "/admin/v1/keys/"), ("OPTIONS", "/admin/v1/accounts"),
    ("GET", "/admin/v1/../v1/accounts"), ("PUT", "/admin/v1/accounts/x/packs"),
])
@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"authorization": ADMIN_TOKEN},
                                     {"x-api-key": ADMIN_TOKEN}, {"authorization": f"Basic {ADMIN_TOKEN}"}])
def test_admin_without_the_token_is_401_whatever_the_path(gw: InProcessGateway, method: str, path: str,
                                                         headers: dict[str, str]) -> None:
    r = gw.request(method, path, headers=headers, content=b"{")
    assert r.status_code == 401, (method, path, r.status_code, r.text)
    assert r.json()["error"]["code"] == "invalid_admin_token"


def test_with_the_token_an_unknown_admin_path_is_404(gw: InProcessGateway) -> None:
    r = gw.request("GET", "/admin/v1/nope", headers=bearer(ADMIN_TOKEN))
    assert r.status_code == 404


def test_secrets_are_compared_in_constant_time(gw: InProcessGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator token goes through hmac.compare_digest; an API key is found by its SHA-256
    (never by the secret, never by prefix) and the final match is compare_digest too."""
    _, key = gw.new_key()
    seen: list[tuple[Any, Any]] = []
    compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(admin_routes, "hmac", _Hmac(spy))
    assert gw.admin("GET", "/stats").status_code == 200
    assert (ADMIN_TOKEN.encode(), ADMIN_TOKEN.encode()) in seen

    seen.clear()
    looked_up: list[str] = []
    store = gw.runtime.store
    real_find = store.find_key

    async def find_key(key_hash: str) -> Any:
        looked_up.append(key_hash)
        return await real_find(key_hash)

    monkeypatch.setattr(accounts_module, "hmac", _Hmac(spy))
    monkeypatch.setattr(store, "find_key", find_key)
    gw.runtime.accounts.forget_cached()
    assert gw.request("GET", "/v2/quotas", headers=bearer(key)).status_code == 200
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert looked_up == [digest]
    assert (digest, digest) in seen


class _Hmac:
    """Stands in for the hmac module inside one module under test."""

    def __init__(self, compare_digest: Any) -> None:
        self.compare_digest = compare_digest


# -- browser-facing headers ----------------------------------------------------------------


def test_dashboard_sends_a_strict_csp_that_allows_only_its_own_files(gw: InProcessGateway) -> None:
    r = gw.request("GET", "/dashboard")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if d.strip())
    assert directives["default-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
    for name in ("script-src", "style-src"):
        assert "unsafe-inline" not in directives[name] and "*" not in directives[name]
    scripts, styles = inline_hashes(r.text, "script"), inline_hashes(r.text, "style")
    # The console keeps its code in its own files; inline code would have to be named by hash.
    assert (scripts, styles) == ([], [])
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert all(h in directives["script-src"] for h in scripts)
    assert all(h in directives["style-src"] for h in styles)
    assert not re.search(r"\son[a-z]+\s*=", r.text), "inline event handlers would be blocked by the CSP"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(("method", "path"), [("GET", "/dashboard"), ("GET", "/v1/models"),
                                              ("OPTIONS", "/v1/chat/completions"), ("OPTIONS", "/v1/messages"),
                                              ("GET", "/v2/quotas"), ("OPTIONS", "/admin/v1/accounts")])
def test_no_cors_header_for_any_origin(gw: InProcessGateway, method: str, path: str) -> None:
    _, key = gw.new_key()
    r = gw.request(method, path, headers={"origin": "https://evil.example", **bearer(key),
                                          "access-control-request-method": "POST"})
    assert r.status_code < 500
    assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)
