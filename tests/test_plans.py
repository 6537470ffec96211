"""Plans as data: the shipped 2026 schedule and plan edits on live accounts, on both stores.

Time is injected (a fake clock in ms): a 202-minute tick is tested without waiting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from cluster.accounts import Accounts
from cluster.controller import AdmissionController, AdmissionRefused
from cluster.open_store import open_store
from cluster.quotas import iso as quotas_iso
from cluster.quotas import quotas_body
from cluster.records import Account
from cluster.store import ReserveRequest, Store, StoreError
from policies.admission import Reason
from policies.plans import DEFAULT_CATALOG, PackSpec, PlanCatalog, SizeClass
from policies.units import MINUTE_MS, PICO_PER_DOLLAR
from serve_apps.config import AppConfig, ConfigError, load_config
from tests.live_gateway import free_port
from tests.processes import kill_session

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = ROOT / "cluster" / "configs" / "plans-synthetic-2026.yaml"
LARGE, SMALL = "hf:packserve/sim-large", "hf:packserve/sim-small"
T0 = 1_800_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


StoreOpener = Callable[[PlanCatalog, int], Awaitable[Store]]
Synthetic = tuple[AppConfig, Store, AdmissionController, FakeClock]


@pytest.fixture(params=["embedded", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    """Opens the SAME stored state each time (one SQLite file, or one Redis), with the plans given."""

    async def _open(plans: PlanCatalog, unit: int) -> Store:
        if request.param == "embedded":
            return await open_store(request_unit=unit, data_dir=tmp_path, plans=plans)
        return await open_store(request_unit=unit, redis_url=request.getfixturevalue("redis_url"), plans=plans)

    if request.param == "redis":
        request.getfixturevalue("redis_url")  # emptied once, before the first open
    return _open


@pytest.fixture
async def synthetic(opener: StoreOpener) -> AsyncIterator[Synthetic]:
    config = load_config(SYNTHETIC)
    clock = FakeClock()
    store = await opener(config.plans.catalog(), config.admission.weight_policy.unit)
    prices = {m.id: m.price() for m in config.models}
    ctl = AdmissionController(store, config.admission, prices, clock=clock)
    yield config, store, ctl, clock
    await ctl.drain()
    await store.close()


async def _burst(ctl: AdmissionController, account: Account, n: int, model: str = LARGE) -> tuple[int, Reason | None]:
    for ok in range(n):
        try:
            ticket = await ctl.reserve(account, "key_test", model, queue_timeout_s=0)
        except AdmissionRefused as refused:
            return ok, refused.reason
        await ctl.settle(ticket, prompt_tokens=0, cached_tokens=0, completion_tokens=0, status="ok",
                         first_token=True, ttft_ms=1)
    return n, None


def test_the_synthetic_2026_file_is_the_published_schedule() -> None:
    config = load_config(SYNTHETIC)
    catalog = config.plans.catalog()
    assert list(catalog.packs) == ["standard"]
    assert (catalog.request_schedule.tick_percent, catalog.request_schedule.tick_ms) == (5, 15 * MINUTE_MS)
    assert (catalog.weekly_schedule.tick_percent, catalog.weekly_schedule.tick_ms) == (2, 202 * MINUTE_MS)
    policy = config.admission.weight_policy
    prices = {m.id: m.price() for m in config.models}
    assert policy.weight(prices[LARGE]) == 1  # the reference model
    assert policy.weight(prices[SMALL]) * 4 == 1  # $0.30/M input against $1.20/M
    assert "read 2026-12-06" in SYNTHETIC.read_text() and "rate-limits page" in SYNTHETIC.read_text()


def test_no_plans_block_is_spec_section_1() -> None:
    config = AppConfig()
    assert config.plans.catalog() == DEFAULT_CATALOG
    assert config.admission.weight_policy.reference_price_micro == 3_400_000


@pytest.mark.parametrize(("plans", "message"), [
    ({"packs": []}, "at least 1"),
    ({"packs": [{"id": "a", "monthly_price": "1", "requests": 1, "weekly_credit": 1}] * 2}, "listed twice"),
    ({"request_bar": {"tick_percent": 0, "tick_minutes": 3}}, "tick_percent"),
    ({"weights": {"reference_price": "1", "reference_model": "hf:x/y"}}, "exactly one"),
    ({"weights": {"reference_model": "hf:x/nope"}}, "not in models"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_plans_are_refused_with_the_field_named(tmp_path: Path, plans: dict[str, object], message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"plans": plans}))
    with pytest.raises(ConfigError, match="plans") as err:
        load_config(path)
    assert message in str(err.value)


async def test_2026_request_bar_gives_back_5_percent_after_15_minutes(synthetic: Synthetic) -> None:
    _, store, ctl, clock = synthetic
    account = await Accounts(store, clock).create("ada", "subscription", ["standard"])
    assert await _burst(ctl, account, 501) == (500, Reason.REQUEST_BAR_EMPTY)
    body = quotas_body(await store.snapshot(account.id, now_ms=clock.now), ctl.policy.unit)
    five_hour = body["rollingFiveHourLimit"]
    assert five_hour["tickPercent"] == 5 and five_hour["remaining"] == 0
    assert five_hour["nextTickAt"] == quotas_iso(T0 + 15 * MINUTE_MS)
    clock.now = T0 + 15 * MINUTE_MS - 1
    assert await _burst(ctl, account, 1) == (0, Reason.REQUEST_BAR_EMPTY)
    # The 429 text names the limit and this plan's schedule, and points to the usage page when configured.
    pointed = AdmissionController(store, ctl.settings.model_copy(update={"dashboard_url": "https://example.test/usage"}),
                                  ctl.prices, clock=clock)
    with pytest.raises(AdmissionRefused) as refused:
        await pointed.reserve(account, "key_test", LARGE, queue_timeout_s=0)
    assert str(refused.value) == ("5-hour request limit of 500 requests reached: the request bar gives back 5% "
                                  "every 15 minutes. See your usage: https://example.test/usage")
    clock.now = T0 + 15 * MINUTE_MS
    assert await _burst(ctl, account, 26) == (25, Reason.REQUEST_BAR_EMPTY)
    # Weighted by input price: the small model's $0.30/M is a quarter of a request.
    clock.now = T0 + 30 * MINUTE_MS
    assert await _burst(ctl, account, 101, SMALL) == (100, Reason.REQUEST_BAR_EMPTY)


async def test_2026_weekly_credit_gives_back_2_percent_after_202_minutes(synthetic: Synthetic) -> None:
    _, store, ctl, clock = synthetic
    account = await Accounts(store, clock).create("ada", "subscription", ["standard"])
    ticket = await ctl.reserve(account, "key_test", LARGE, queue_timeout_s=0)
    # 20M input tokens at $1.20/M = $24: the whole weekly credit.
    await ctl.settle(ticket, prompt_tokens=20_000_000, cached_tokens=0, completion_tokens=0, status="ok",
                     first_token=True, ttft_ms=1)
    assert await _burst(ctl, account, 1) == (0, Reason.WEEKLY_TOKENS_EXHAUSTED)
    weekly = quotas_body(await store.snapshot(account.id, now_ms=clock.now), ctl.policy.unit)["weeklyTokenLimit"]
    assert weekly["remainingCredits"] == "$0.00" and weekly["nextRegenCredits"] == "$0.48"
    assert weekly["nextRegenAt"] == quotas_iso(T0 + 202 * MINUTE_MS)
    clock.now = T0 + 202 * MINUTE_MS - 1
    assert await _burst(ctl, account, 1) == (0, Reason.WEEKLY_TOKENS_EXHAUSTED)
    with pytest.raises(AdmissionRefused, match=r"weekly token limit of \$24.00 reached: the weekly credit gives "
                                               r"back 2% \(\$0.48\) every 202 minutes$"):
        await ctl.reserve(account, "key_test", LARGE, queue_timeout_s=0)
    clock.now = T0 + 202 * MINUTE_MS
    snap = await store.snapshot(account.id, now_ms=clock.now)
    assert snap.weekly is not None and snap.weekly.level == 48 * PICO_PER_DOLLAR // 100


async def test_editing_a_pack_kind_keeps_each_live_accounts_remaining_fraction(opener: StoreOpener) -> None:
    unit = AppConfig().admission.weight_policy.unit
    store = await opener(DEFAULT_CATALOG, unit)
    account = await Accounts(store).create("ada", "subscription", ["standard"])
    snap = await store.snapshot(account.id, now_ms=T0)
    assert snap.request_spec is not None
    # 100 of 500 requests used (80% left), the weekly bar untouched.
    await store.reserve(ReserveRequest(account.id, LARGE, SizeClass.STANDARD, 100 * unit, "l1", 60_000), now_ms=T0)
    await store.close()

    edited = PlanCatalog({"standard": PackSpec(1000, 48, 1, 2, 6000, "Standard")}, DEFAULT_CATALOG.request_schedule,
                         DEFAULT_CATALOG.weekly_schedule)
    store = await opener(edited, unit)
    try:
        snap = await store.snapshot(account.id, now_ms=T0 + 1)
        assert snap.request_spec is not None and snap.request_spec.capacity == 1000 * unit
        assert snap.request is not None and snap.request.level == 800 * unit  # still 80%: no refill, no drain
        assert snap.request.anchor_ms == T0  # the running tick interval is kept
        assert snap.weekly is not None and snap.weekly.level == 48 * PICO_PER_DOLLAR  # full stays full
        assert snap.account.limits().monthly_price_cents == 6000
    finally:
        await store.close()

    # A new reference price ($1.70 instead of $3.40: the unit halves) keeps the fraction too.
    store = await opener(edited, unit // 2)
    try:
        snap = await store.snapshot(account.id, now_ms=T0 + 2)
        assert snap.request is not None and snap.request.level == 800 * (unit // 2)
    finally:
        await store.close()

    # Removing a pack kind an account still holds is refused at start, naming it.
    with pytest.raises(StoreError, match="'standard'"):
        await opener(PlanCatalog({"team": PackSpec(100, 10, 1, 1, 100)}), unit)


async def test_a_store_opened_without_applying_plans_writes_nothing(redis_url: str) -> None:
    """The local CLI opens the store this way: run without the gateways' config, it must not undo their plans."""
    from redis.asyncio import Redis

    unit = AppConfig().admission.weight_policy.unit
    edited = PlanCatalog({"standard": PackSpec(1000, 48, 1, 2, 6000)})
    store = await open_store(request_unit=unit, redis_url=redis_url, plans=edited)
    account = await Accounts(store).create("ada", "subscription", ["standard"])
    await store.close()
    store = await open_store(request_unit=unit, redis_url=redis_url, apply_plans=False)  # SPEC §1 defaults
    await store.close()
    raw = Redis.from_url(redis_url)
    try:
        assert await raw.hget(f"packserve:{{{account.id}}}:account", "r_req") == b"1000"
    finally:
        await raw.aclose()
    store = await open_store(request_unit=unit, redis_url=redis_url)  # a gateway with the defaults does apply them
    await store.close()
    raw = Redis.from_url(redis_url)
    try:
        assert await raw.hget(f"packserve:{{{account.id}}}:account", "r_req") == b"500"
    finally:
        await raw.aclose()


@pytest.mark.slow
def test_the_gateway_starts_with_the_synthetic_2026_config(tmp_path: Path) -> None:
    """`packserve gateway --engine sim --config cluster/configs/plans-synthetic-2026.yaml`, as a process."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PACKSERVE_ADMIN_TOKEN": "plans-test-token",
           "PACKSERVE_DATA_DIR": str(tmp_path)}
    env.pop("PACKSERVE_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "serve_apps", "gateway", "--engine", "sim", "--config",
                             str(SYNTHETIC), "--port", str(port)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(300):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.1)
            admin = {"authorization": "Bearer plans-test-token"}
            founder = client.post("/admin/v1/accounts", headers=admin,
                                  json={"name": "x", "plan": "subscription", "packs": ["founder"]})
            assert founder.status_code == 400 and "founder" in founder.text  # not a kind of these plans
            account = client.post("/admin/v1/accounts", headers=admin,
                                  json={"name": "x", "plan": "subscription", "packs": ["standard"]}).json()
            key = client.post(f"/admin/v1/accounts/{account['id']}/keys", headers=admin).json()["key"]
            sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=key)
            sdk.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            quotas = client.get("/v2/quotas", headers={"authorization": f"Bearer {key}"}).json()
        assert quotas["rollingFiveHourLimit"]["tickPercent"] == 5
        assert quotas["rollingFiveHourLimit"]["remaining"] == 499.75  # input-price weight 0.25
        assert quotas["weeklyTokenLimit"]["nextRegenCredits"] == "$0.48"
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_local_cli_reads_the_plans_of_its_config(tmp_path: Path) -> None:
    env = {**os.environ, "PACKSERVE_DATA_DIR": str(tmp_path)}
    env.pop("PACKSERVE_REDIS_URL", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "serve_apps", "--json", "--config", str(SYNTHETIC), *args],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    refused = cli("accounts", "create", "x", "--packs", "founder")
    assert refused.returncode != 0 and "unknown pack kind 'founder'" in refused.stderr
    created = cli("accounts", "create", "x", "--packs", "standard")
    assert created.returncode == 0, created.stderr
    quota = cli("quota", json.loads(created.stdout)["id"])
    assert quota.returncode == 0, quota.stderr
    assert json.loads(quota.stdout)["rollingFiveHourLimit"]["tickPercent"] == 5
