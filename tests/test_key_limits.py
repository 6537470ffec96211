"""Per-key limits: allow-list, expiry, disabled flag, and caps on the key's share of the bars.

Store level on both stores with injected time; then through a live gateway
with the official openai and anthropic SDKs (403/429 shapes and codes,
nothing charged on refusal); then the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from cluster.accounts import Accounts
from cluster.controller import AdmissionController, AdmissionRefused
from cluster.embedded_store import EmbeddedStore
from cluster.key_limits import check_key_access, with_limits
from cluster.records import ApiKey
from cluster.settings import AdmissionSettings
from cluster.store import Store
from policies.admission import Reason
from policies.plans import PlanError, SizeClass
from policies.pricing import ModelPrice
from policies.units import MINUTE_MS, PICO_PER_DOLLAR
from tests.conftest import RedisServer
from tests.live_gateway import LiveGateway

LARGE = "hf:test/large-3.40"
PRICES = {LARGE: ModelPrice(1_200_000, 3_400_000, SizeClass.STANDARD)}
T0 = 1_800_000_000_000
SIM_LARGE, SIM_SMALL = "hf:packserve/sim-large", "hf:packserve/sim-small"


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["embedded", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, Accounts, AdmissionController,
                                                                         FakeClock]]:
    clock = FakeClock()
    settings = AdmissionSettings(queue_timeout_s=0)
    store: Store
    if request.param == "embedded":
        store = EmbeddedStore(None, request_unit=settings.weight_policy.unit, clock=clock)
    else:
        from cluster.redis_store import RedisStore

        store = await RedisStore.connect(request.getfixturevalue("redis_url"), request_unit=settings.weight_policy.unit)
    ctl = AdmissionController(store, settings, PRICES, clock=clock)
    yield store, Accounts(store, clock), ctl, clock
    await ctl.drain()
    await store.close()


Harness = tuple[Store, Accounts, AdmissionController, FakeClock]


async def _one(ctl: AdmissionController, accounts: Accounts, account_id: str, key_id: str,
               prompt: int = 0) -> Reason | None:
    account = await accounts.get(account_id)
    try:
        ticket = await ctl.reserve(account, key_id, LARGE, queue_timeout_s=0)
    except AdmissionRefused as refused:
        return refused.reason
    await ctl.settle(ticket, prompt_tokens=prompt, cached_tokens=0, completion_tokens=0, status="ok",
                     first_token=True, ttft_ms=1)
    return None


async def test_a_key_request_cap_is_its_own_bar_and_refusals_charge_nothing(harness: Harness) -> None:
    store, accounts, ctl, clock = harness
    account = await accounts.create("ada", "subscription", ["standard"])
    ci = (await accounts.create_key(account.id, {"max_requests": 3})).key
    other = (await accounts.create_key(account.id)).key
    assert [await _one(ctl, accounts, account.id, ci.id) for _ in range(4)] == [
        None, None, None, Reason.KEY_REQUEST_CAP_REACHED]
    snap = await store.snapshot(account.id, now_ms=clock.now)
    assert snap.request is not None and snap.request.level == 497 * ctl.policy.unit  # the refusal cost nothing
    assert await _one(ctl, accounts, account.id, other.id) is None  # the account still has room
    # The key's bar recharges on the plan's schedule: 5% of 3 requests (0.15) every 3 minutes.
    clock.now = T0 + 6 * 3 * MINUTE_MS  # 0.9 of a request back
    assert await _one(ctl, accounts, account.id, ci.id) is Reason.KEY_REQUEST_CAP_REACHED
    clock.now = T0 + 7 * 3 * MINUTE_MS  # 1.05 back
    assert await _one(ctl, accounts, account.id, ci.id) is None
    # Raising the cap keeps the key bar's remaining fraction: 0.05 of 3 becomes 5 of 300.
    await accounts.update_key(account.id, ci.id, {"max_requests": 300})
    for _ in range(5):
        assert await _one(ctl, accounts, account.id, ci.id) is None
    assert await _one(ctl, accounts, account.id, ci.id) is Reason.KEY_REQUEST_CAP_REACHED


async def test_a_key_weekly_cap_refuses_once_its_credit_is_spent(harness: Harness) -> None:
    store, accounts, ctl, clock = harness
    account = await accounts.create("ada", "subscription", ["standard"])
    key = (await accounts.create_key(account.id, {"max_weekly_usd": "1.20"})).key
    assert await _one(ctl, accounts, account.id, key.id, prompt=1_000_000) is None  # $1.20 of input
    assert await _one(ctl, accounts, account.id, key.id) is Reason.KEY_WEEKLY_CAP_REACHED
    snap = await store.snapshot(account.id, now_ms=clock.now)
    assert snap.weekly is not None and snap.weekly.level == 24 * PICO_PER_DOLLAR - 12 * PICO_PER_DOLLAR // 10
    clock.now = T0 + 180 * MINUTE_MS  # 2% of $1.20 comes back
    assert await _one(ctl, accounts, account.id, key.id) is None


async def test_key_limits_are_stored_and_updated_on_both_stores(harness: Harness) -> None:
    store, accounts, _, _ = harness
    account = await accounts.create("ada", "subscription", ["standard"])
    created = await accounts.create_key(account.id, {"models": [LARGE], "expires": "2027-01-01T00:00:00Z",
                                                     "max_requests": 100, "max_weekly_usd": 5})
    found = await store.find_key(created.key.key_hash)
    assert found == created.key and found.models == (LARGE,) and found.max_weekly_pico == 5 * PICO_PER_DOLLAR
    assert found.expires_ms == 1_798_761_600_000
    updated = await accounts.update_key(account.id, created.key.id, {"disabled": True, "clear": ["models"]})
    assert (await store.find_key(created.key.key_hash)) == updated
    assert updated.disabled and updated.models == () and updated.max_requests == 100


async def test_key_caps_are_refused_on_payg_accounts(harness: Harness) -> None:
    _, accounts, _, _ = harness
    account = await accounts.create("p", "payg")
    with pytest.raises(PlanError, match="payg"):
        await accounts.create_key(account.id, {"max_requests": 10})
    key = (await accounts.create_key(account.id, {"models": [LARGE]})).key
    with pytest.raises(PlanError, match="payg"):
        await accounts.update_key(account.id, key.id, {"max_weekly_usd": 1})


def test_access_rules_name_the_limit() -> None:
    key = ApiKey("key_1", "acct", "h", "ps-abcdefg", 0)
    assert check_key_access(key, LARGE, T0) is None
    refusal = check_key_access(with_limits(key, models=["hf:a/b"]), LARGE, T0)
    assert refusal is not None and (refusal.status, refusal.code) == (403, "model_not_allowed")
    assert "hf:a/b" in refusal.message and LARGE in refusal.message
    refusal = check_key_access(with_limits(key, expires=T0), LARGE, T0)
    assert refusal is not None and refusal.code == "key_expired" and "expired at" in refusal.message
    refusal = check_key_access(with_limits(key, disabled=True), LARGE, T0)
    assert refusal is not None and refusal.code == "key_disabled"
    for bad in ({"max_requests": 0}, {"max_weekly_usd": "-1"}, {"expires": "tomorrow"}, {"models": "hf:a/b"}):
        with pytest.raises(PlanError):
            with_limits(key, **bad)


# -- through the gateway, with the official SDKs -----------------------------------------------

@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path_factory.mktemp("gw-keys"), queue_timeout_s=0) as g:
        yield g


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def _key(gw: LiveGateway, account_id: str, **limits: object) -> tuple[str, str]:
    r = gw.admin.post(f"/admin/v1/accounts/{account_id}/keys", json=limits)
    assert r.status_code == 201, r.text
    return str(r.json()["id"]), str(r.json()["key"])


def _oai(gw: LiveGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=30)


def _claude(gw: LiveGateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.base_url}/anthropic", api_key=key, max_retries=0, timeout=30)


def _chat(gw: LiveGateway, key: str, model: str = SIM_LARGE) -> None:
    _oai(gw, key).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def _message(gw: LiveGateway, key: str, model: str = SIM_LARGE) -> None:
    _claude(gw, key).messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])


def test_key_refusals_through_both_sdks_charge_nothing(gw: LiveGateway) -> None:
    account = gw.create_account(["standard"])
    _, plain = _key(gw, account["id"])
    _, small_only = _key(gw, account["id"], models=[SIM_SMALL])
    _, expired = _key(gw, account["id"], expires="2020-01-01T00:00:00Z")
    capped_id, capped = _key(gw, account["id"], max_requests=1)
    before = gw.quotas(plain)["rollingFiveHourLimit"]["remaining"]

    with pytest.raises(openai.PermissionDeniedError) as denied:
        _chat(gw, small_only)
    assert denied.value.status_code == 403 and denied.value.code == "model_not_allowed"
    assert SIM_LARGE in denied.value.message and SIM_SMALL in denied.value.message
    with pytest.raises(anthropic.PermissionDeniedError) as denied_a:
        _message(gw, small_only)
    assert "allow-list" in denied_a.value.message
    with pytest.raises(openai.PermissionDeniedError) as expired_err:
        _chat(gw, expired)
    assert expired_err.value.code == "key_expired" and "2020-01-01T00:00:00Z" in expired_err.value.message
    with pytest.raises(anthropic.PermissionDeniedError, match="expired"):
        _message(gw, expired)
    assert gw.quotas(plain)["rollingFiveHourLimit"]["remaining"] == before  # nothing charged

    _chat(gw, capped)  # the one request this key may make in its bar
    with pytest.raises(openai.RateLimitError) as limited:
        _chat(gw, capped)
    assert limited.value.code == "key_request_cap_reached"
    assert "limit of 1 requests of the 5-hour request bar" in limited.value.message
    assert limited.value.response.headers.get("retry-after")
    with pytest.raises(anthropic.RateLimitError, match="limit of 1 requests"):
        _message(gw, capped)
    assert gw.quotas(plain)["rollingFiveHourLimit"]["remaining"] == before - 1  # only the admitted one

    r = gw.admin.patch(f"/admin/v1/accounts/{account['id']}/keys/{capped_id}", json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    with pytest.raises(openai.PermissionDeniedError) as disabled:
        _chat(gw, capped)
    assert disabled.value.code == "key_disabled"
    bad = gw.admin.patch(f"/admin/v1/accounts/{account['id']}/keys/{capped_id}", json={"max_requests": "many"})
    assert bad.status_code == 400 and "max_requests" in bad.text
    events = gw.usage_events(account["id"])
    assert len(events) == 1  # refused requests left no usage


@pytest.mark.slow
def test_cli_creates_and_updates_a_limited_key(tmp_path: Path) -> None:
    env = {**os.environ, "PACKSERVE_DATA_DIR": str(tmp_path)}
    env.pop("PACKSERVE_REDIS_URL", None)

    def cli(*args: str) -> dict[str, object]:
        done = subprocess.run([sys.executable, "-m", "serve_apps", "--json", *args], capture_output=True, text=True,
                              env=env, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    account = cli("accounts", "create", "ci", "--packs", "standard")
    key = cli("keys", "create", str(account["id"]), "--models", SIM_SMALL, "--expires", "2027-06-01T00:00:00Z",
              "--max-requests", "100", "--max-weekly-usd", "2.50")
    assert key["models"] == [SIM_SMALL] and key["max_requests"] == 100 and key["max_weekly_usd"] == 2.5
    assert str(key["key"]).startswith("ps-")
    updated = cli("keys", "update", str(account["id"]), str(key["id"]), "--disabled", "--clear", "models")
    assert updated["disabled"] is True and updated["models"] == [] and updated["max_requests"] == 100
