"""serve_apps.ray_env: the environment packserve starts Ray with, and the HAProxy clean-up."""

from __future__ import annotations

import subprocess
import sys
import time

from serve_apps import ray_env


def test_ray_env_is_the_throughput_mode_unless_the_operator_says_otherwise() -> None:
    assert ray_env.worker_env({}) == dict(ray_env.THROUGHPUT_ENV)
    assert ray_env.THROUGHPUT_ENV["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    off = ray_env.worker_env({"RAY_SERVE_ENABLE_HA_PROXY": "0", "UNRELATED": "x"})
    assert off == {**ray_env.THROUGHPUT_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    assert ray_env.runtime_env({}) == {"env_vars": dict(ray_env.THROUGHPUT_ENV)}
    assert ray_env.node_env({}) == {"RAY_worker_niceness": "0"}
    assert ray_env.node_env({"RAY_worker_niceness": "15"}) == {"RAY_worker_niceness": "15"}


def test_shutdown_stops_haproxy_processes_started_since_and_only_those() -> None:
    # Stand-ins: processes whose command line names the HAProxy binary Ray Serve runs.
    def fake_haproxy() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 f"/x/site-packages/{ray_env.HAPROXY_MARK}"])

    older = fake_haproxy()
    newer: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 10
        while older.pid not in ray_env.haproxy_pids():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        before = ray_env.haproxy_pids()
        newer = fake_haproxy()
        while newer.pid not in ray_env.haproxy_pids():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ray_env.shutdown_local(before)  # Ray is not running here: only the clean-up acts
        assert newer.wait(timeout=10) != 0
        assert older.poll() is None
    finally:
        for proc in (older, newer):
            if proc is not None:
                proc.kill()
                proc.wait()
