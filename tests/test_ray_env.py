"""serve_apps.deploy.ray_env: the environment packserve starts Ray with, and the HAProxy clean-up."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from serve_apps.deploy import ray_compat, ray_env
from serve_apps.host import ports as host_ports


def test_ray_env_is_the_throughput_mode_unless_the_operator_says_otherwise() -> None:
    assert ray_env.worker_env({}) == dict(ray_env.THROUGHPUT_ENV)
    assert ray_env.THROUGHPUT_ENV["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    off = ray_env.worker_env({"RAY_SERVE_ENABLE_HA_PROXY": "0", "UNRELATED": "x"})
    assert off == {**ray_env.THROUGHPUT_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    assert ray_env.runtime_env({}) == {"env_vars": dict(ray_env.THROUGHPUT_ENV)}
    assert ray_env.node_env({}) == {"RAY_worker_niceness": "0"}
    assert ray_env.node_env({"RAY_worker_niceness": "15"}) == {"RAY_worker_niceness": "15"}


def test_a_local_ray_gets_a_short_ingress_drain_and_free_haproxy_side_ports() -> None:
    env = ray_env.local_runtime_env({})["env_vars"]
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    assert {k: env[k] for k in ray_env.THROUGHPUT_ENV} == dict(ray_env.THROUGHPUT_ENV)
    ports = [int(env[k]) for k in ray_env.HAPROXY_SIDE_PORTS]
    assert len(set(ports)) == 2 and all(p > 0 for p in ports)
    # Outside the kernel's ephemeral range, which Ray's own port-0 sockets draw from while Ray starts.
    ephemeral_from = host_ports.ephemeral_range_start()
    assert ephemeral_from is not None
    assert all(host_ports.FIXED_PORTS_FROM <= p < ephemeral_from for p in ports)
    chosen = ray_env.local_runtime_env({"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30",
                                        "RAY_SERVE_HAPROXY_STATS_PORT": "18404"})["env_vars"]
    assert chosen["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    assert chosen["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_haproxy_clean_up_stops_only_its_own_nodes_processes() -> None:
    """Stand-ins for two local Rays' HAProxy processes; the clean-up of one leaves the other alone.

    Only `stop_haproxy` is called: `shutdown_local` would also shut down the
    test session's own Ray if one is running in this process.
    """
    mine, theirs = "a" * 56, "b" * 56  # Ray node ids are 56 hex characters

    def fake_haproxy(node_id: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 f"/x/site-packages/{ray_compat.HAPROXY_MARK}",
                                 f"/tmp/haproxy-serve/{node_id}/haproxy.cfg"])

    procs = [fake_haproxy(mine), fake_haproxy(theirs)]
    try:
        deadline = time.monotonic() + 10
        while not {p.pid for p in procs} <= ray_env.haproxy_pids():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ray_env.haproxy_pids(mine) == {procs[0].pid}
        assert ray_env.stop_haproxy(mine) == {procs[0].pid}
        assert procs[0].wait(timeout=10) != 0
        assert procs[1].poll() is None
        with pytest.raises(ValueError):
            ray_env.stop_haproxy("")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
