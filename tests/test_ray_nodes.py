"""A two-node Ray cluster on this machine: the worker node SIGKILLed under load.

A head (`ray start --head`, the gateway, Serve's controller and proxy) and a
worker node (`ray start --address=HEAD`, no CPUs to offer, so the gateway
stays on the head) each offer the custom resource `sim_node` (2 on the head,
1 on the worker); sim-large runs two replicas that need one each
(`resources.custom`), which Serve's SPREAD scheduling puts one on each
node. Under load (streams that have streamed, and streams still waiting for
their first token) the worker node's whole process session is SIGKILLed,
raylet and replica alike: every stream on its replica ends at once with an
error in the OpenAI shape (no hang), those on the head's run to the end;
the ones without a first token are refunded (the
request bar and the usage ledger agree exactly with what the clients saw);
Ray starts the lost replica on the head and serving resumes with no
operator action. The time to recovery is printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from serve_apps.cli.serve_main import CONFIG_DIR
from serve_apps.deploy import ray_env
from serve_apps.deploy.serving_plan import deployment_name
from serve_apps.host.ports import free_port
from tests.conftest import RedisServer
from tests.processes import kill_session, session_members

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
APP = "nodes"
MODEL = "hf:packserve/sim-large"  # weight 1.0: one request-bar unit per charged request
ADMIN_TOKEN = "two-node-admin-token"
START_TIMEOUT_S = 120.0
RECOVERY_TIMEOUT_S = 240.0
STREAMED = 6  # streams that have streamed when the node dies
WAITING = 4  # streams still waiting for their first token
PACKS = 5  # founder packs an account may hold: a sim-large slot each
# 3 s to the first token, then 5 a second: 11 s, the kill lands mid-stream. The simulated answer
# to this seed and prompt runs to 47 tokens, so a stream that is not cut ends by length.
MAX_TOKENS = 40
SEED = 6

# Deploys the application onto the cluster and exits (Serve keeps it running). The proxy
# stays on the head: both nodes share 127.0.0.1, so a proxy on each would fight for the port.
DEPLOY = """
import sys
from pathlib import Path

import ray
from ray import serve

from serve_apps.config import load_config
from serve_apps.deploy.ray_app import build_app

address, config, port, token, app = sys.argv[1:6]
ray.init(address=address, log_to_driver=False)
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": int(port)},
            logging_config={"enable_access_log": False})
serve.run(build_app(load_config(Path(config)), admin_token=token), name=app, route_prefix="/", blocking=False)
"""


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    log: Path

    def replicas(self, model: str) -> list[int]:
        """Live replica processes of `model` on this node (its session), by the title Ray gives them."""
        title = f"ServeReplica:{APP}:{deployment_name(model)}".encode()
        pids = []
        for pid in session_members(self.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if title in f.read():
                        pids.append(pid)
            except OSError:
                continue
        return pids


@dataclass
class TwoNodes:
    head: Node
    worker: Node
    base_url: str
    gcs: str
    env: dict[str, str]


def _start_node(args: list[str], env: dict[str, str], log: Path) -> Node:
    with log.open("wb") as out:
        proc = subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", *args], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    node = Node(proc, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"`ray start` did not start (exit {proc.poll()}): {log.read_text()[-3000:]}")
        time.sleep(0.5)
    return node


def _stop_node(node: Node) -> None:
    kill_session(node.proc.pid)
    node.proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while session_members(node.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)


def _ports() -> list[str]:
    """Every port a node binds, free: two nodes on one machine must not share Ray's defaults."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]


def _config(path: Path, redis: RedisServer, port: int) -> Path:
    config = yaml.safe_load((CONFIG_DIR / "local-sim.yaml").read_text())
    config.pop("demo_account", None)
    config["store"] = {"redis_url": redis.url, "data_dir": str(path.parent / "data")}
    config["gateway"].update({"port": port, "num_cpus": 0.25})
    config["sim"] = {"ttft_ms": 3000, "tokens_per_s": 5}
    (large,) = [m for m in config["models"] if m["id"] == MODEL]
    large.update({"resources": {"num_cpus": 0, "custom": {"sim_node": 1}},
                  "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                  # Ray's power of two choices: the streams spread over both replicas.
                  "routing": "default"})
    config["models"] = [large]
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def two_nodes(tmp_path: Path, redis_server: RedisServer) -> Iterator[TwoNodes]:
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {**ray_env.CLUSTER_AUTH_ENV, "RAY_AUTH_TOKEN_PATH": str(token)}
    base = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "PACKSERVE_"))}
    base["PYTHONPATH"] = str(REPO)  # every node's workers import packserve from the checkout
    node_env = {**base, **ray_env.node_env({}), **ray_env.worker_env({}), **ray_env.LOCAL_ENV, **auth,
                **ray_env.haproxy_side_ports({})}
    gcs_port, http_port = free_port(), free_port()
    # Ray's socket paths must stay short: temp dirs under /tmp, not pytest's deep one.
    temp_dirs = [tempfile.mkdtemp(prefix="rn-", dir="/tmp") for _ in range(2)]
    nodes: list[Node] = []
    try:
        nodes.append(_start_node(
            ["--head", "--port", str(gcs_port), "--num-cpus", "2", "--resources", json.dumps({"sim_node": 2}),
             "--include-dashboard", "false", "--ray-client-server-port", str(free_port()), "--temp-dir",
             temp_dirs[0], *_ports()], node_env, tmp_path / "head.log"))
        gcs = f"127.0.0.1:{gcs_port}"
        nodes.append(_start_node(
            ["--address", gcs, "--num-cpus", "0", "--resources", json.dumps({"sim_node": 1}),
             "--temp-dir", temp_dirs[1], *_ports()], node_env, tmp_path / "worker.log"))
        config = _config(tmp_path / "nodes.yaml", redis_server, http_port)
        deployed = subprocess.run([sys.executable, "-c", DEPLOY, gcs, str(config), str(http_port), ADMIN_TOKEN, APP],
                                  env={**base, **auth}, cwd=REPO, capture_output=True, text=True,
                                  timeout=START_TIMEOUT_S)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        yield TwoNodes(nodes[0], nodes[1], f"http://127.0.0.1:{http_port}", gcs, {**base, **auth})
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        for directory in temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def _admin(cluster: TwoNodes) -> httpx.Client:
    return httpx.Client(base_url=cluster.base_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)


def _new_key(admin: httpx.Client, packs: int) -> tuple[str, str]:
    account = admin.post("/admin/v1/accounts", json={"name": "nodes", "packs": ["founder"] * packs})
    assert account.status_code == 201, account.text
    key = admin.post(f"/admin/v1/accounts/{account.json()['id']}/keys")
    assert key.status_code == 201, key.text
    return str(account.json()["id"]), str(key.json()["key"])


def _stream(base_url: str, key: str, out: dict[str, Any]) -> None:
    """One streamed chat completion through the OpenAI SDK: content chunks seen, and how it ended."""
    out["chunks"] = 0
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)
    try:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "write at length"}], max_tokens=MAX_TOKENS,
            seed=SEED, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                out["chunks"] += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                out["finish"] = chunk.choices[0].finish_reason
        out["end"] = "done"
    except openai.APIStatusError as exc:  # refused before the stream began (an HTTP error)
        out["end"], out["status"], out["error"] = "http_error", exc.status_code, exc.body
    except openai.APIError as exc:  # an error event in the stream
        out["end"], out["error"] = "error_event", exc.body
    finally:
        out["ended_at"] = time.monotonic()


def _chat_ok(base_url: str, key: str) -> bool:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)
    try:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2)
    except openai.APIStatusError as exc:
        assert exc.status_code in (502, 503), exc  # a dead or missing replica, never anything else
        return False
    return reply.usage is not None and reply.usage.completion_tokens > 0


def _in_shape(error: Any) -> bool:
    """An OpenAI error object (the SDK hands over the `error` member): message, type, param and code
    (a stream's error event, like OpenAI's, may have a null code)."""
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str) \
        and {"param", "code"} <= set(error)


def test_the_worker_node_killed_under_load(two_nodes: TwoNodes) -> None:
    cluster = two_nodes
    with _admin(cluster) as admin:
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(cluster.head.replicas(MODEL)) + len(cluster.worker.replicas(MODEL)) < 2 \
                or not _up(admin):
            assert time.monotonic() < deadline, "the application did not come up on both nodes"
            time.sleep(0.5)
        # The replicas are spread: one on each node (the head offers 2 sim_node, the worker 1).
        assert len(cluster.worker.replicas(MODEL)) == 1 and len(cluster.head.replicas(MODEL)) == 1

        accounts = [_new_key(admin, PACKS) for _ in range(2)]  # a slot for each stream
        _, probe_key = _new_key(admin, PACKS)

        def remaining(key: str) -> float:
            r = httpx.get(f"{cluster.base_url}/v2/quotas", headers={"authorization": f"Bearer {key}"}, timeout=30)
            return float(r.json()["rollingFiveHourLimit"]["remaining"])

        full = [remaining(key) for _, key in accounts]
        streamed: list[dict[str, Any]] = [{"account": i % 2} for i in range(STREAMED)]
        waiting: list[dict[str, Any]] = [{"account": i % 2} for i in range(WAITING)]
        threads = [threading.Thread(target=_stream, args=(cluster.base_url, accounts[out["account"]][1], out))
                   for out in streamed]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while min(out.get("chunks", 0) for out in streamed) < 2:
            assert time.monotonic() < deadline and all(t.is_alive() for t in threads), streamed
            time.sleep(0.05)
        later = [threading.Thread(target=_stream, args=(cluster.base_url, accounts[out["account"]][1], out))
                 for out in waiting]
        for t in later:
            t.start()
        time.sleep(1.0)  # admitted, and inside their 3 s to the first token
        assert all(out["chunks"] == 0 for out in waiting)

        # The whole worker node: raylet, replica, agents.
        kill_session(cluster.worker.proc.pid)
        killed = time.monotonic()
        for t in threads + later:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads + later), "a stream hung after its node died"
        ended_s = max(out["ended_at"] for out in streamed + waiting if "error" in out) - killed

        # The streams on the worker's replica ended with an error in shape; those on the head's ran to the end.
        for out in streamed:
            assert out["end"] in ("done", "error_event"), out
            if out["end"] == "done":
                assert out["finish"] == "length", out
            else:
                assert _in_shape(out["error"]) and 0 < out["chunks"] < MAX_TOKENS, out
        cut = [out for out in streamed if out["end"] != "done"]
        assert cut, "no stream ran on the killed node"
        for out in waiting:
            if out["end"] != "done":
                assert out["chunks"] == 0 and _in_shape(out["error"]), out
                # Refused before the stream (an HTTP error, with its code), or an error event before any token.
                assert out.get("status") in (None, 502, 503), out
                assert out.get("status") is None or out["error"]["code"], out
        refunded = [out for out in waiting if out["end"] != "done"]
        assert refunded, "no request was waiting for its first token on the killed node"

        # Exactly the requests that saw a token are charged; the rest came back, and the ledger agrees.
        _settled(admin)
        for i, (account_id, key) in enumerate(accounts):
            mine = [out for out in streamed + waiting if out["account"] == i]
            charged = sum(1 for out in mine if out["chunks"] > 0)
            assert remaining(key) == full[i] - charged
            r = admin.get(f"/admin/v1/accounts/{account_id}/usage/export")
            events = [json.loads(line) for line in r.text.splitlines() if line.strip()]
            assert len(events) == len(mine)
            assert sum(1 for e in events if e["ttft_ms"] is not None) == charged
            assert sum(e["weight"] for e in events) == charged

        # With no operator action: Ray starts the lost replica on the head, and the model serves again.
        first_ok = replaced = None
        failed = 0  # requests refused (502/503, uncharged) before the first one served
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            if first_ok is None:
                if _chat_ok(cluster.base_url, probe_key):
                    first_ok = time.monotonic() - killed
                else:
                    failed += 1
            if replaced is None and len(cluster.head.replicas(MODEL)) == 2:
                replaced = time.monotonic() - killed
            if first_ok is not None and replaced is not None:
                # Both replicas serve: four at once, all answered.
                with ThreadPoolExecutor(4) as pool:
                    if all(pool.map(lambda _: _chat_ok(cluster.base_url, probe_key), range(4))):
                        break
            assert time.monotonic() < deadline, f"not recovered {RECOVERY_TIMEOUT_S:.0f} s after the kill"
            time.sleep(0.5)
        recovered_s = time.monotonic() - killed
        _settled(admin)
    print(f"worker node kill: {len(cut)} streamed and {len(refunded)} waiting streams ended with errors "
          f"{ended_s:.1f} s after the SIGKILL; a request served again after {first_ok:.1f} s ({failed} refused "
          f"before it); the lost replica "
          f"ran on the head after {replaced:.1f} s; recovered (both replicas serving) after {recovered_s:.1f} s")


def _up(admin: httpx.Client) -> bool:
    try:
        return admin.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def _settled(admin: httpx.Client) -> None:
    """Every slot back and every settlement written (the gateway settles in the background)."""
    deadline = time.monotonic() + 30
    while True:
        stats = admin.get("/admin/v1/stats").json()
        if stats["in_flight"] == 0 and not stats.get("settlements_pending"):
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
