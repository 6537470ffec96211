"""A model replica SIGKILLed mid-stream under Ray Serve (the session Ray of conftest `ray_serve`).

The whole application (gateway ingress + sim-large at exactly one replica)
serves through the HTTP proxy. Two streams of one account (2 founder packs: 2
sim-large slots) are running when the replica's process is killed: the one
that has streamed gets an error event (no hang) and pays for what it got;
the one still waiting for its first token gets its error event and its
request-bar charge back. Both slots are free at once (no lease TTL to wait
out), and the replica Ray starts in place of the dead one serves the next
request, with no operator action.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from serve_apps.config import AppConfig
from serve_apps.deploy.ray_app import build_app
from serve_apps.deploy.serving_plan import deployment_name
from serve_apps.engines.sim import SIM_CARDS, SIM_LARGE
from tests.conftest import RayServe, RedisServer

pytestmark = pytest.mark.ray

APP = "replica-chaos"
ADMIN_TOKEN = "replica-chaos-admin-token"


def chaos_config(redis_url: str, data_dir: Path) -> AppConfig:
    large = next(c for c in SIM_CARDS if c.id == SIM_LARGE)
    return AppConfig.model_validate({
        "engine": "sim",
        "store": {"redis_url": redis_url, "data_dir": str(data_dir)},
        "admission": {"queue_timeout_s": 0},
        "gateway": {"num_cpus": 0.25},
        # 3 s to the first token, then 5 tokens a second: time to kill mid-stream, and to catch a
        # second request before its first token.
        "sim": {"ttft_ms": 3000, "tokens_per_s": 5},
        "models": [{"id": SIM_LARGE, "features": list(large.features), "resources": {"num_cpus": 0.25},
                    "input_price": "1.20", "output_price": "3.40",
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1}}],
    })


def replica_pids(model: str) -> list[int]:
    """Live replica processes of `model` in this application, by the title Ray gives them
    (`ray::ServeReplica:<app>:<deployment>`; the session Ray runs no dashboard, so no state API)."""
    title = f"ServeReplica:{APP}:{deployment_name(model)}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if title in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def app(ray_serve: RayServe, redis_server: RedisServer,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    try:
        config = chaos_config(redis_server.url, tmp_path_factory.mktemp("replica-chaos"))
        serve.run(build_app(config, admin_token=ADMIN_TOKEN), name=APP, route_prefix="/", blocking=False)
        with httpx.Client(base_url=ray_serve.base_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                          timeout=60) as admin:
            deadline = time.monotonic() + 120
            while not replica_pids(SIM_LARGE) or admin.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "the application did not come up"
                time.sleep(0.5)
            yield admin
    finally:
        serve.delete(APP)


def stream(base_url: str, key: str, out: dict[str, Any]) -> None:
    out["chunks"] = 0
    body = {"model": SIM_LARGE, "stream": True, "max_tokens": 60,
            "messages": [{"role": "user", "content": "write at length"}]}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key}"}, timeout=120) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    out["error"] = event["error"]
                elif event["choices"] and event["choices"][0]["delta"].get("content"):
                    out["chunks"] += 1


def test_a_replica_killed_mid_stream(app: httpx.Client) -> None:
    account = app.post("/admin/v1/accounts", json={"name": "chaos", "packs": ["founder", "founder"]}).json()
    key = app.post(f"/admin/v1/accounts/{account['id']}/keys").json()["key"]
    base = str(app.base_url).rstrip("/")

    def remaining() -> float:
        r = httpx.get(f"{base}/v2/quotas", headers={"authorization": f"Bearer {key}"}, timeout=10)
        return float(r.json()["rollingFiveHourLimit"]["remaining"])

    full = remaining()
    (pid,) = replica_pids(SIM_LARGE)
    streamed: dict[str, Any] = {}
    waiting: dict[str, Any] = {}
    first = threading.Thread(target=stream, args=(base, key, streamed))
    first.start()
    deadline = time.monotonic() + 60
    while streamed.get("chunks", 0) < 3:
        assert time.monotonic() < deadline and first.is_alive(), streamed
        time.sleep(0.05)
    second = threading.Thread(target=stream, args=(base, key, waiting))
    second.start()
    time.sleep(0.5)  # the second is admitted and inside its 3 s to the first token
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    first.join(timeout=60)
    second.join(timeout=60)
    assert not first.is_alive() and not second.is_alive(), "a stream hung after its replica died"
    ended_s = time.monotonic() - killed

    assert streamed["status"] == 200 and streamed["chunks"] >= 3 and "done" not in streamed
    assert isinstance(streamed["error"]["message"], str)
    # The second never saw a token: an error (as an event, or an HTTP error before the stream), refunded.
    assert waiting.get("chunks", 0) == 0 and "done" not in waiting
    # Charged once (the first, which streamed); the second's charge came back.
    assert remaining() == full - 1

    # Both slots are free at once, and the replacement replica serves, with no operator action.
    deadline = time.monotonic() + 120
    while True:
        r = httpx.post(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=120,
                       json={"model": SIM_LARGE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        if r.status_code == 200:
            break
        assert r.status_code in (502, 503), r.text
        assert time.monotonic() < deadline, "no replacement replica served within 120 s"
        time.sleep(1)
    recovered_s = time.monotonic() - killed
    assert replica_pids(SIM_LARGE) and replica_pids(SIM_LARGE) != [pid]
    stats = app.get("/admin/v1/stats").json()
    assert stats["in_flight"] == 0
    print(f"replica kill: streams ended {ended_s:.1f} s after the SIGKILL; served again after {recovered_s:.1f} s")
