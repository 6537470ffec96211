"""The cluster deploys of docs/deploy.md, run for real against a `ray start --head` node started as the cluster
files start one: `ray job submit --working-dir . -- python -m serve_apps.cli.serve_main --config FILE`, and
the KubeRay manifest's `serveConfigV2` sent through Serve's REST API (`serve deploy`, what the
KubeRay operator does), which builds the application in the cluster with `app_builder`.

A resubmit must restart only what changed (deployment versions,
serve_apps/deploy/versions.py). The node gets the environment every node of
cluster/configs/ gets (Ray Serve's throughput mode, engines at nice 0) plus Ray
token authentication, and the job driver inherits it, as on a real cluster.
This caught a deploy that failed on every such cluster: the driver's handles,
built under the inherited throughput mode, refused the blocking calls of its
readiness check. The application uses
the simulated engine; the model engines are covered by test_ray_vllm.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis
import yaml

from serve_apps.cli.serve_main import CONFIG_DIR
from serve_apps.deploy import ray_env
from serve_apps.host.ports import free_port
from tests.conftest import RedisServer
from tests.processes import kill_session, session_members

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
SERVE = Path(sys.executable).with_name("serve")
KUBERAY = REPO / "cluster" / "configs" / "kuberay-rayservice.yaml"
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 600.0
SIM_TOKENS_PER_S = 0.5
# 80 s at SIM_TOKENS_PER_S: longer than what a replaced gateway replica gets by
# default (Ray keeps it reachable 30 s, then gives it 20 s of graceful shutdown).
# The simulated answer to LONG_STREAM_SEED runs to 47 tokens, so it ends by length.
LONG_STREAM_TOKENS = 40
LONG_STREAM_SEED = 6


@dataclass(frozen=True)
class Cluster:
    dashboard: str
    gcs: str
    env: dict[str, str]  # what an operator's shell needs to reach it (the token)

    def replicas(self) -> dict[str, set[str]]:
        """Live Serve replica actors: deployment name → replica actor names (new ones on every restart).

        A replaced replica still draining its streams is alive beside its successor.
        """
        listed = subprocess.run([str(RAY), "list", "actors", "--filter", "state=ALIVE", "--format", "json",
                                 "--limit", "1000", "--address", self.gcs],
                                env=self.env, capture_output=True, text=True, timeout=60, check=True)
        out: dict[str, set[str]] = {}
        for actor in json.loads(listed.stdout):
            if actor["class_name"].startswith("ServeReplica:"):
                out.setdefault(actor["class_name"].rsplit(":", 1)[1], set()).add(actor["name"])
        return out


def _wait_for_dashboard(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start` exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            # 401 without the token: up, and enforcing authentication.
            if httpx.get(f"{url}/api/version", timeout=2).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Ray dashboard at {url} did not answer within {START_TIMEOUT_S:.0f} s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A one-node Ray cluster started with `ray start --head --block` in its own session, all ports free."""
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {**ray_env.CLUSTER_AUTH_ENV, "RAY_AUTH_TOKEN_PATH": str(token)}
    node_env = {**ray_env.node_env({}), **ray_env.worker_env({}), **auth,
                # Another Ray (the test session's) may hold HAProxy's default side ports.
                **ray_env.haproxy_side_ports({}),
                # The job's `python` is the one with packserve's dependencies, as in the cluster image.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "PACKSERVE_"))}
    dashboard_port, gcs_port = free_port(), free_port()
    # Ray's socket paths must stay short: a temp dir under /tmp, not pytest's deep one.
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
    log = tmp_path / "ray-start.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "2",
             "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
             "--temp-dir", temp_dir],
            env={**env, **node_env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_dashboard(url, proc, log)
        yield Cluster(url, f"127.0.0.1:{gcs_port}", {**env, **auth})
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(cluster: Cluster, config: Path, redis: RedisServer, admin_token: str) -> subprocess.CompletedProcess[str]:
    runtime_env = {"env_vars": {"PACKSERVE_REDIS_URL": redis.url, "PACKSERVE_ADMIN_TOKEN": admin_token}}
    return subprocess.run(
        [str(RAY), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env),
         "--", "python", "-m", "serve_apps.cli.serve_main", "--config", str(config)],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def test_ray_job_submit_deploys_and_redeploys_only_what_changed(cluster: Cluster, redis_server: RedisServer,
                                                                tmp_path: Path) -> None:
    redis_server.flushall()
    path, port = _sim_config(tmp_path)
    admin_token = secrets.token_urlsafe(16)

    job = _submit(cluster, path, redis_server, admin_token)
    assert job.returncode == 0, f"{job.stdout[-3000:]}\n{job.stderr[-2000:]}"
    assert "Serve keeps it running after this job ends" in job.stdout + job.stderr
    assert f"the gateway answers on port {port} of every node" in job.stdout + job.stderr
    assert "PACKSERVE_ADMIN_TOKEN is not set" not in job.stdout + job.stderr
    # The job has ended; Serve runs the application, against the store the job named.
    key = _serves_an_account(port, admin_token, redis_server)
    first = cluster.replicas()
    assert set(first) == {"gateway", "model-packserve--sim-large", "model-packserve--sim-small",
                          "model-packserve--sim-embed"}

    # The same config again (a re-run pipeline): nothing restarts.
    again = _submit(cluster, path, redis_server, admin_token)
    assert again.returncode == 0, f"{again.stdout[-3000:]}\n{again.stderr[-2000:]}"
    assert cluster.replicas() == first

    # A price (the gateway's business) and one model's context length (its engine's): only those restart.
    # A stream open on the old gateway replica meanwhile runs to its end (graceful_shutdown_timeout_s).
    long_stream = ThreadPoolExecutor(1).submit(_stream_tokens, port, key, LONG_STREAM_TOKENS)
    config = yaml.safe_load(path.read_text())
    models = {m["id"]: m for m in config["models"]}
    models["hf:packserve/sim-small"]["output_price"] = "9.99"
    models["hf:packserve/sim-large"]["context_length"] = 16384
    path.write_text(yaml.safe_dump(config))
    changed = _submit(cluster, path, redis_server, admin_token)
    assert changed.returncode == 0, f"{changed.stdout[-3000:]}\n{changed.stderr[-2000:]}"
    now = cluster.replicas()
    assert {name for name in first if now[name] != first[name]} == {"gateway", "model-packserve--sim-large"}
    assert now["gateway"] - first["gateway"] and now["model-packserve--sim-large"] - first["model-packserve--sim-large"]
    assert long_stream.result(timeout=JOB_TIMEOUT_S) == (LONG_STREAM_TOKENS, "length")
    listed = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key).models.list()
    by_id = {m.id: m.model_dump() for m in listed.data}
    assert by_id["hf:packserve/sim-small"]["pricing"]["output_per_million"] == "$9.99"
    assert by_id["hf:packserve/sim-large"]["context_length"] == 16384


def _stream_tokens(port: int, key: str, max_tokens: int) -> tuple[int, str | None]:
    """A streamed chat completion's completion tokens and finish reason."""
    stream = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0).chat.completions.create(
        model="hf:packserve/sim-small", messages=[{"role": "user", "content": "write at length"}],
        max_tokens=max_tokens, seed=LONG_STREAM_SEED, stream=True, stream_options={"include_usage": True})
    finish, tokens = None, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, finish


def _sim_config(tmp_path: Path) -> tuple[Path, int]:
    config = yaml.safe_load((CONFIG_DIR / "local-sim.yaml").read_text())
    config["gateway"]["port"] = free_port()
    # Slow enough that a stream outlives Ray's default 20 s graceful shutdown of a replaced replica.
    config["sim"]["tokens_per_s"] = SIM_TOKENS_PER_S
    config["gateway"]["graceful_shutdown_timeout_s"] = 120
    config.pop("demo_account", None)  # a cluster deploy creates no account; the operator does
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config["gateway"]["port"]


def _serves_an_account(port: int, admin_token: str, redis_server: RedisServer) -> str:
    """The deployed gateway: admin API with the operator's token, a key, a chat completion, usage in Redis."""
    base = f"http://127.0.0.1:{port}"
    admin = {"authorization": f"Bearer {admin_token}"}
    account = httpx.post(f"{base}/admin/v1/accounts", headers=admin,
                         json={"name": "cluster", "packs": ["standard"]}, timeout=30)
    assert account.status_code == 201, account.text
    key = httpx.post(f"{base}/admin/v1/accounts/{account.json()['id']}/keys", headers=admin, timeout=30)
    assert key.status_code == 201, key.text
    chat = openai.OpenAI(base_url=f"{base}/v1", api_key=key.json()["key"]).chat.completions.create(
        model="hf:packserve/sim-small", messages=[{"role": "user", "content": "hello"}], max_tokens=2)
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    assert redis.Redis.from_url(redis_server.url).dbsize() > 0, "the gateway did not use the Redis it was given"
    return str(key.json()["key"])


def test_kuberay_serve_config_deploys_through_the_rest_api(cluster: Cluster, redis_server: RedisServer,
                                                           tmp_path: Path) -> None:
    redis_server.flushall()
    path, port = _sim_config(tmp_path)
    admin_token = secrets.token_urlsafe(16)
    service = next(d for d in yaml.safe_load_all(KUBERAY.read_text()) if d and d["kind"] == "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve_config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = serve_config["applications"]
    # The image: the packages at /app, the config at the manifest's own relative path (the simulated
    # catalog here); env vars stand for the pods' environment on KubeRay.
    image = tmp_path / "app"
    for package in ("serve_apps", "cluster", "policies"):
        shutil.copytree(REPO / package, image / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(path, image / app["args"]["config"])
    assert app["runtime_env"] == {"working_dir": "local:///app"}
    app["runtime_env"] = {"working_dir": f"local://{image}", "env_vars": {"PACKSERVE_REDIS_URL": redis_server.url,
                                                                  "PACKSERVE_ADMIN_TOKEN": admin_token}}
    deploy_file = tmp_path / "serve-config.yaml"
    deploy_file.write_text(yaml.safe_dump(serve_config))

    deployed = subprocess.run([str(SERVE), "deploy", str(deploy_file), "--address", cluster.dashboard],
                              cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, f"{deployed.stdout[-2000:]}\n{deployed.stderr[-2000:]}"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = ""
    while time.monotonic() < deadline:
        status = subprocess.run([str(SERVE), "status", "--address", cluster.dashboard], env=cluster.env,
                                capture_output=True, text=True, timeout=60).stdout
        if "DEPLOY_FAILED" in status or yaml.safe_load(status)["applications"].get(app["name"], {}).get(
                "status") == "RUNNING":
            break
        time.sleep(1)
    assert yaml.safe_load(status)["applications"][app["name"]]["status"] == "RUNNING", status
    _serves_an_account(port, admin_token, redis_server)
