"""Idle and slow-header connections against a real `packserve gateway` process (raw sockets).

With `gateway.header_timeout_s` and `gateway.keep_alive_timeout_s` at 1 s: a
connection that never sends a request, a client trickling its headers a byte
at a time, and an idle keep-alive connection after a response are all closed
by the server; a request whose headers arrived in time is never cut, however
long its response runs, and a keep-alive connection serves its next request.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import openai
import pytest

from tests.gateway_process import GatewayProcess

TIMEOUT_S = 1
# Generous: the server must close well within this, on a loaded machine too.
CLOSED_WITHIN_S = 8.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {"gateway": {"header_timeout_s": TIMEOUT_S, "keep_alive_timeout_s": TIMEOUT_S},
              # 5 tokens a second: a 10-token stream runs 2 s, past both timeouts.
              "sim": {"tokens_per_s": 5}}
    with GatewayProcess(tmp_path_factory.mktemp("timeouts"), config=config) as gw:
        yield gw


def connect(gw: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=CLOSED_WITHIN_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (socket.timeout if it keeps the connection open)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a content-length (headers and body, however the segments arrive)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_connection_that_never_sends_a_request_is_closed(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # closed without a word: there was no request to answer
        assert TIMEOUT_S * 0.9 <= time.monotonic() - started < CLOSED_WITHIN_S


def test_slow_headers_are_cut_off_with_a_408(gateway: GatewayProcess) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1000
    with connect(gateway) as sock:
        started = time.monotonic()
        answer = b""
        for i in range(len(request)):
            # One byte every 0.1 s: each byte used to cancel the only timer uvicorn had.
            try:
                sock.sendall(request[i:i + 1])
            except OSError:  # closed before this byte: the answer is already here
                answer = read_until_closed(sock)
                break
            if select.select([sock], [], [], 0.1)[0]:
                answer = read_until_closed(sock)
                break
            assert time.monotonic() - started < CLOSED_WITHIN_S, "slow headers kept the connection open"
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert TIMEOUT_S * 0.9 <= elapsed < CLOSED_WITHIN_S


def test_an_idle_keep_alive_connection_is_closed_after_its_response(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started < CLOSED_WITHIN_S


def test_a_keep_alive_connection_serves_its_next_request_then_times_out(gateway: GatewayProcess) -> None:
    with connect(gateway) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(TIMEOUT_S / 4)
        # The next request's headers, begun and never finished: the deadline counts from the last response.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < CLOSED_WITHIN_S


def test_many_idle_connections_are_all_closed(gateway: GatewayProcess) -> None:
    socks = [connect(gateway) for _ in range(200)]
    try:
        for i, sock in enumerate(socks):
            if i % 2:  # half of them after one request, half without any
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                read_response(sock)
        assert [read_until_closed(sock) for sock in socks] == [b""] * len(socks)
    finally:
        for sock in socks:
            sock.close()


def test_a_response_longer_than_the_timeouts_is_never_cut(gateway: GatewayProcess) -> None:
    _, key = gateway.new_key(["standard"])
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=60)
    for _ in range(2):  # the second on the client's keep-alive connection
        started = time.monotonic()
        stream = client.chat.completions.create(
            model="hf:packserve/sim-large", messages=[{"role": "user", "content": "write at length"}],
            max_tokens=10, stream=True, stream_options={"include_usage": True})
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert usage and usage[0].completion_tokens == 10
        assert time.monotonic() - started > TIMEOUT_S * 1.5
