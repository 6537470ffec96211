"""A Redis outage or a gateway crash loses no usage record and leaks no slot.

Settlements wait in the outbox while the store is away; a killed gateway's
responses are settled from their last checkpoint by another gateway, however
early in the response it died.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from cluster.accounts import Accounts
from cluster.controller import CHECKPOINT_GRACE_MS, AdmissionController
from cluster.outbox import SettleOutbox
from cluster.records import UsageEvent
from cluster.redis_store import RedisStore
from cluster.settings import AdmissionSettings
from cluster.store import Settlement
from policies.plans import SizeClass
from policies.pricing import ModelPrice
from tests.conftest import RedisServer, free_port

MODEL = "hf:test/m"
CRASH_LEASE_TTL_S = 1.5
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



@pytest.mark.slow
def test_a_killed_gateway_still_records_what_it_streamed(redis_url: str, tmp_path: Path) -> None:
    """SIGKILL mid-stream: the checkpoint of its last lease renewal is settled by another gateway's sweep."""
    # A short lease: renewals (and checkpoints) every 0.5 s, so the test streams for a few seconds only.
    account_id, received = _stream_then_kill_the_gateway(redis_url, tmp_path, CRASH_LEASE_TTL_S, kill_after=12)
    event, weekly_paid = asyncio.run(_sweep_settles_it(redis_url, account_id, CRASH_LEASE_TTL_S))
    assert 0 < event.completion_tokens <= received and event.cost_pico > 0
    assert weekly_paid


@pytest.mark.slow
def test_a_gateway_killed_before_its_first_renewal_still_leaves_the_usage_record(redis_url: str,
                                                                                 tmp_path: Path) -> None:
    """SIGKILL a second into a stream, long before the first renewal (10 s with the default 30 s lease)."""
    lease_ttl_s = 30.0
    account_id, received = _stream_then_kill_the_gateway(redis_url, tmp_path, lease_ttl_s, kill_after=1)
    assert received == 1
    event, weekly_paid = asyncio.run(_sweep_settles_it(redis_url, account_id, lease_ttl_s))
    # The checkpoint written as the response started (the counts it had by then: none, or its first token);
    # the request-bar charge stands.
    assert event.completion_tokens <= received and event.weight_units > 0
    assert weekly_paid == (event.cost_pico > 0)


def _stream_then_kill_the_gateway(redis_url: str, tmp_path: Path, lease_ttl_s: float,
                                  kill_after: int) -> tuple[str, int]:
    """Stream from a real `packserve gateway` and SIGKILL it after `kill_after` content chunks."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"engine": "sim", "admission": {"lease_ttl_s": lease_ttl_s}}))
    port = free_port()
    env = {**os.environ, "PACKSERVE_ADMIN_TOKEN": "admin-for-crash-test", "PACKSERVE_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "serve_apps", "--redis-url", redis_url, "gateway", "--engine",
                             "sim", "--config", str(config), "--port", str(port), "--sim-tokens-per-s", "5"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        admin = {"authorization": "Bearer admin-for-crash-test"}
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the gateway did not start"
            time.sleep(0.1)
        account = httpx.post(f"{base}/admin/v1/accounts", headers=admin,
                             json={"name": "crash", "packs": ["standard"]}).json()
        key = httpx.post(f"{base}/admin/v1/accounts/{account['id']}/keys", headers=admin).json()["key"]
        stream = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="hf:packserve/sim-small", messages=[{"role": "user", "content": "write at length"}],
            max_tokens=40, seed=6, stream=True)  # 40 tokens at 5/s: 8 s
        received = 0
        for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received >= kill_after:  # 12: ~2.4 s in, several renewals of a 1.5 s lease have checkpointed
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
        return str(account["id"]), received
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


async def _sweep_settles_it(redis_url: str, account_id: str, lease_ttl_s: float) -> tuple[UsageEvent, bool]:
    """Another gateway's sweep, once the checkpoint is due: the one usage event, and whether the weekly bar paid."""
    settings = AdmissionSettings(lease_ttl_s=lease_ttl_s)
    store = await RedisStore.connect(redis_url, request_unit=settings.weight_policy.unit)
    try:
        assert await store.usage(account_id) == []  # the dead gateway settled nothing
        due = await store.now_ms() + settings.lease_ttl_ms + CHECKPOINT_GRACE_MS
        sweeper = AdmissionController(store, settings, {}, clock=lambda: due)
        assert await sweeper.settle_due_checkpoints() == 1
        (event,) = await store.usage(account_id)
        assert event.status == "interrupted" and event.model == "hf:packserve/sim-small"
        snapshot = await store.snapshot(account_id, due)
        assert snapshot.weekly is not None and snapshot.weekly_spec is not None
        assert await store.active_leases(account_id, "hf:packserve/sim-small", due) == 0
        return event, snapshot.weekly.level < snapshot.weekly_spec.capacity
    finally:
        await store.close()
