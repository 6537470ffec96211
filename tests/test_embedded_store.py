"""Embedded-store specifics: persistence across a restart, and sharing a data dir between processes."""

from __future__ import annotations

from pathlib import Path

from cluster.accounts import Accounts
from cluster.controller import AdmissionController
from cluster.embedded_store import EmbeddedStore
from cluster.settings import AdmissionSettings
from policies.plans import SizeClass
from policies.pricing import ModelPrice

MODEL = "hf:test/m"
PRICES = {MODEL: ModelPrice(1_200_000, 3_400_000, SizeClass.STANDARD)}


async def test_bars_keys_and_usage_survive_restart(tmp_path: Path) -> None:
    settings = AdmissionSettings()
    now = 1_800_000_000_000
    db = tmp_path / "packserve.db"
    store = EmbeddedStore(db, request_unit=settings.weight_policy.unit, clock=lambda: now)
    accounts = Accounts(store)
    account = await accounts.create("a", "subscription", ["standard"])
    key = await accounts.create_key(account.id)
    ctl = AdmissionController(store, settings, PRICES, clock=lambda: now)
    for _ in range(3):
        ticket = await ctl.reserve(account, key.key.id, MODEL, queue_timeout_s=0)
        await ctl.settle(ticket, prompt_tokens=100, cached_tokens=0, completion_tokens=50, status="ok",
                         first_token=True, ttft_ms=5)
    await store.close()

    reopened = EmbeddedStore(db, request_unit=settings.weight_policy.unit, clock=lambda: now)
    principal = await Accounts(reopened).authenticate(key.secret)
    assert principal.account.id == account.id
    snap = await reopened.snapshot(account.id)
    assert snap.request is not None and snap.request.level == 497 * settings.weight_policy.unit
    events = await reopened.usage(account.id)
    assert [(e.prompt_tokens, e.completion_tokens, e.ttft_ms) for e in events] == [(100, 50, 5)] * 3
    await reopened.close()


async def test_two_processes_share_one_data_dir(tmp_path: Path) -> None:
    """A CLI-style second store on the same file sees and makes changes atomically."""
    unit = AdmissionSettings().weight_policy.unit
    server = EmbeddedStore(tmp_path / "db", request_unit=unit)
    cli = EmbeddedStore(tmp_path / "db", request_unit=unit)
    account = await Accounts(cli).create("b", "subscription", ["founder"])
    assert await server.get_account(account.id) == account
    await Accounts(cli).set_plan(account.id, "subscription", ["founder", "standard"])
    changed = await server.get_account(account.id)
    assert changed is not None and len(changed.packs) == 2
    await server.close()
    await cli.close()
