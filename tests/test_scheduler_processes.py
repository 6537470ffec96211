"""Two `packserve gateway` processes on one Redis share each model's capacity (SPEC §4).

Each process runs its own simulated engine with `--sim-max-seqs 2`, so the
engines alone would run 4 sequences; the shared scheduler must keep the model
at 2 across both, dispatch by the virtual token counters, and give a
SIGKILLed gateway's sequences back when their leases expire (a short lease TTL
from the config file; the waiting request's wait bound is a few TTLs while the
dead gateway's streams would run for a minute, so it is served only if the
capacity came back by expiry).

Preemption is off here: it pauses a sequence in the engine that runs it, and
these stand-in engines are one per process, not one shared model (the
single-process tests in tests/test_preemption_gateway.py cover it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from tests.live_gateway import ADMIN_TOKEN, free_port, wait_for

LARGE = "hf:packserve/sim-large"
LEASE_TTL_S = 1.0
WAIT_BOUND_S = 6 * LEASE_TTL_S
TOKENS_PER_S = 40
CONFIG = f"""
scheduler:
  mode: fair
  lease_ttl_s: {LEASE_TTL_S}
  queue_timeout_s: {WAIT_BOUND_S}
  poll_interval_s: 0.05
"""


class Gateway:
    def __init__(self, redis_url: str, data_dir: Path, config: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PACKSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "PACKSERVE_DATA_DIR": str(data_dir)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve_apps", "gateway", "--engine", "sim", "--port", str(self.port),
             "--redis-url", redis_url, "--config", str(config), "--sim-max-seqs", "2",
             "--sim-tokens-per-s", str(TOKENS_PER_S), "--scheduler", "fair", "--no-preempt"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.admin = httpx.Client(base_url=self.base, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)

    def wait_up(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("gateway process did not start")

    def capacity(self) -> dict[str, Any]:
        stats = self.admin.get("/admin/v1/stats").json()
        return dict(next(m for m in stats["capacity"] if m["model"] == LARGE))

    def key(self, **account: Any) -> str:
        created = self.admin.post("/admin/v1/accounts", json={"name": "t", **account})
        assert created.status_code == 201, created.text
        return str(self.admin.post(f"/admin/v1/accounts/{created.json()['id']}/keys").json()["key"])

    def stop(self) -> None:
        self.admin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def gateways(redis_url: str, tmp_path: Path) -> Iterator[list[Gateway]]:
    config = tmp_path / "sched.yaml"
    config.write_text(CONFIG)
    gws = [Gateway(redis_url, tmp_path / f"gw{i}", config) for i in range(2)]
    try:
        for g in gws:
            g.wait_up()
        yield gws
    finally:
        for g in gws:
            g.stop()


class Stream:
    """One streamed request in a thread: when its first token and its end reached the client."""

    def __init__(self, gw: Gateway, key: str, tokens: int, name: str) -> None:
        self.name = name
        self.first: float | None = None
        self.end: float | None = None
        self.status: int | None = None
        self._client = httpx.Client(base_url=gw.base, timeout=60, headers={"authorization": f"Bearer {key}"})
        self._body = {"model": LARGE, "stream": True, "max_tokens": tokens, "ignore_eos": True,
                      "messages": [{"role": "user", "content": f"request {name}"}]}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self._client.stream("POST", "/v1/chat/completions", json=self._body) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if self.first is None and '"content"' in line:
                        self.first = time.monotonic()
                self.end = time.monotonic()
        except httpx.HTTPError:
            self.end = time.monotonic()
        finally:
            self._client.close()

    def join(self) -> None:
        self.thread.join(60)


def arrivals(redis: Redis) -> int:
    """Requests that have asked for the model so far (the store's arrival sequence: it only grows)."""
    return int(redis.hget(f"packserve:cap:{{{LARGE}}}:meta", "seq") or 0)


@pytest.mark.slow
def test_two_gateways_share_capacity_and_dispatch_by_counter(gateways: list[Gateway], redis_url: str) -> None:
    heavy = gateways[0].key(plan="payg", concurrency=8)
    lights = [gateways[0].key(plan="subscription", packs=["standard"]) for _ in range(2)]
    redis = Redis.from_url(redis_url)
    peak = {"in_flight": 0}
    sampling = threading.Event()

    def sample() -> None:
        # The store's view across both gateways, sampled while the run lasts.
        while not sampling.is_set():
            peak["in_flight"] = max(peak["in_flight"], *(g.capacity()["in_flight"] for g in gateways))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    streams: list[Stream] = []
    # A known arrival order: each request has asked for the model before the next one is sent. The first
    # two are long, so both still run (and the heavy account's counter has grown at their renewals) when
    # the light ones arrive, however slowly a loaded machine sends them.
    for i, tokens in enumerate((80, 80, 10, 10)):
        streams.append(Stream(gateways[i % 2], heavy, tokens, f"H{i + 1}"))
        wait_for(lambda n=i + 1: arrivals(redis) >= n, f"H{i + 1} to arrive", attempts=1000)
    for j, key in enumerate(lights):
        streams.append(Stream(gateways[(j + 1) % 2], key, 10, f"L{j + 1}"))
        wait_for(lambda n=j + 5: arrivals(redis) >= n, f"L{j + 1} to arrive", attempts=1000)
    for s in streams:
        s.join()
    sampling.set()
    sampler.join(10)
    redis.close()
    assert [s.status for s in streams] == [200] * 6
    order = [s.name for s in sorted(streams, key=lambda s: s.first or float("inf"))]
    # The heavy account had been served (H1, H2, counted at their renewals) when the lights arrived idle
    # and were lifted to its counter: each light request goes before the heavy account's waiting ones
    # (fifo would serve H3, H4 first).
    assert order[:2] == ["H1", "H2"] or order[:2] == ["H2", "H1"], order
    assert order[2:4] == ["L1", "L2"], order
    assert sorted(order[4:]) == ["H3", "H4"], order
    # Never more than 2 in flight across both gateways: the store's count, and what the clients saw.
    assert peak["in_flight"] <= 2
    events = sorted([(s.first or 0.0, 1) for s in streams] + [(s.end or 0.0, -1) for s in streams])
    running = 0
    for _, delta in events:
        running += delta
        assert running <= 2, events


@pytest.mark.slow
def test_a_sigkilled_gateways_capacity_comes_back_within_the_lease_ttl(gateways: list[Gateway]) -> None:
    doomed, survivor = gateways
    holders = [Stream(doomed, doomed.key(plan="subscription", packs=["standard"]), 2000, f"K{i}") for i in range(2)]
    wait_for(lambda: survivor.capacity()["in_flight"] == 2, "the doomed gateway to hold both sequences", attempts=1000)
    waiter = Stream(survivor, survivor.key(plan="subscription", packs=["standard"]), 5, "W")
    wait_for(lambda: survivor.capacity()["waiting"] == 1, "the survivor's request to wait", attempts=1000)
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(10)
    # The waiter's bound is a few lease TTLs, the dead streams' length a minute: it is served only if the
    # dead gateway's leases expired.
    waiter.join()
    for h in holders:
        h.join()
    assert waiter.status == 200 and waiter.first is not None
    stats = survivor.capacity()
    assert (stats["in_flight"], stats["waiting"]) == (0, 0)
