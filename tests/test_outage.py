"""A Redis outage loses no usage record and leaks no slot: settlements wait in the outbox."""

from __future__ import annotations

from pathlib import Path

from cluster.accounts import Accounts
from cluster.controller import AdmissionController
from cluster.outbox import SettleOutbox
from cluster.redis_store import RedisStore
from cluster.settings import AdmissionSettings
from cluster.store import Settlement
from policies.plans import SizeClass
from policies.pricing import ModelPrice
from tests.conftest import RedisServer

MODEL = "hf:test/m"
PRICES = {MODEL: ModelPrice(1_200_000, 3_400_000, SizeClass.STANDARD)}


async def test_settlement_survives_an_outage_and_a_gateway_restart(persistent_redis: RedisServer,
                                                                   tmp_path: Path) -> None:
    settings = AdmissionSettings(queue_timeout_s=0)
    unit = settings.weight_policy.unit
    spool = tmp_path / "settlements.pending"
    store = await RedisStore.connect(persistent_redis.url, request_unit=unit)
    account = await Accounts(store).create("o", "subscription", ["standard"])
    ctl = AdmissionController(store, settings, PRICES, outbox=SettleOutbox(store, spool, max_backoff_s=0.05))
    ticket = await ctl.reserve(account, "key_o", MODEL)

    persistent_redis.stop()  # the store goes away mid-request
    snapshot = await ctl.settle(ticket, prompt_tokens=1000, cached_tokens=200, completion_tokens=300,
                                status="ok", first_token=True, ttft_ms=12)
    assert snapshot is None  # not settled yet: kept
    assert len(ctl.outbox) == 1 and spool.exists()
    await ctl.outbox.close()  # the gateway dies before Redis is back
    await store.close()

    persistent_redis.start()
    store = await RedisStore.connect(persistent_redis.url, request_unit=unit)
    outbox = SettleOutbox(store, spool)  # a new gateway process finds the spool
    assert len(outbox) == 1
    assert await outbox.flush() == 0
    assert not spool.exists()
    events = await store.usage(account.id)
    assert [(e.prompt_tokens, e.cached_tokens, e.completion_tokens, e.status) for e in events] == [
        (1000, 200, 300, "ok")]
    # Replaying the same settlement again (e.g. a second spool copy) does not double-charge.
    await store.settle(Settlement(ticket.lease, 1, 0, events[0], 14 * 86_400_000))
    assert len(await store.usage(account.id)) == 1
    assert await store.active_leases(account.id, MODEL) == 0
    await store.close()

