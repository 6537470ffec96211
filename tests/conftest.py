"""Shared fixtures. Redis tests start their own redis-server on a free port.

They never touch a Redis they did not start (a system service may be running
on 6379): every server here is launched by the fixture, on a port it chose.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from serve_apps.host.ports import free_port as free_port  # re-exported: tests import it from here

STARTUP_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed or not on PATH: the Redis store tests need it "
            "(e.g. apt-get install redis-server)"
        )
    return path


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """A redis-server process owned by the tests."""

    port: int
    directory: Path
    persistent: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
        ]
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}; see {self.directory / 'redis.log'}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def flushall(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            reply = sock.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL failed on the test Redis: {reply!r}")


def start_redis(directory: Path, *, persistent: bool = False) -> RedisServer:
    """Start an extra redis-server (appendonly when `persistent`); the caller stops it."""
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(free_port(), directory, persistent)
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server, emptied before each test."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with appendonly on, for restart tests."""
    server = start_redis(tmp_path / "redis-aof", persistent=True)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RayServe:
    """The session's local Ray instance with Serve's HTTP proxy on `port`.

    Modules deploy their own application on it at route prefix "/" and delete
    it in their teardown, so only one application owns the proxy at a time.
    """

    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def call_model(model_id: str, method: str, app_name: str, timeout_s: float) -> Any:
    """`method()` of `model_id`'s deployment in `app_name`, through a handle shut down afterwards.

    A handle left behind keeps its router running in this process for the
    rest of the session (metrics pushes, long polls), and that router follows
    any later deployment of the same name in the same application.
    """
    from ray import serve

    from serve_apps.deploy.serving_plan import deployment_name

    handle = serve.get_deployment_handle(deployment_name(model_id), app_name=app_name)
    try:
        return getattr(handle, method).remote().result(timeout_s=timeout_s)
    finally:
        handle.shutdown()  # type: ignore[no-untyped-call]


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[RayServe]:
    """One local Ray (2 CPUs, no dashboard) and Serve for the whole session (~15 s to start)."""
    # Imported here: most test modules never need Ray, and importing it is slow.
    from ray import serve

    from serve_apps.deploy import ray_env

    port = free_port()
    # The same Ray packserve deploys on (engines at nice 0; HAProxy, direct ingress, gRPC between deployments),
    # split from vLLM's CPUs as `packserve serve` does for local.yaml (serve_apps/host/cpu_split.py).
    local_ray = ray_env.init_local(ray_env.engine_cpu_split(), num_cpus=2, include_dashboard=False,
                                   log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
        yield RayServe(port)
    finally:
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray_env.shutdown_local(local_ray)


REDIS_FIXTURES = frozenset({"redis_server", "redis_url", "persistent_redis"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The redis tier follows from the fixtures a test uses, so it cannot be forgotten.
    for item in items:
        if REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)
