"""Every Redis the tests and benchmarks start listens on loopback only (it has no password)."""

from __future__ import annotations

import socket
from pathlib import Path

from bench.common import redis_server as bench_redis_server
from tests.conftest import RedisServer


def _bind(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"CONFIG GET bind\r\n")
        return sock.recv(256)


def test_the_bench_redis_binds_loopback_only() -> None:
    with bench_redis_server() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert b"\r\n127.0.0.1\r\n" in _bind(port)


def test_the_test_redis_binds_loopback_only(redis_server: RedisServer, tmp_path: Path) -> None:
    assert b"\r\n127.0.0.1\r\n" in _bind(redis_server.port)
