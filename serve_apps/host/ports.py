"""Ports on this machine: free now, or free and outside every range that hands out ports on its own."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Collection, Mapping, Sequence


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the tests and benchmarks use it too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Ray's workers take ports 10002-19999 by default; below 20000 is Ray's, above
# the ephemeral range's start is the kernel's (see `reserved_free_port`).
FIXED_PORTS_FROM = 20000
EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def reserved_free_port(exclude: Collection[int] = (), rng: random.Random | None = None) -> int:
    """A port free on every interface now that nothing else will be handed meanwhile.

    For a listener that binds seconds later (HAProxy's side ports, bound once
    Serve starts): a port from `free_port` lies in the kernel's ephemeral
    range, which the kernel keeps handing to Ray's own port-0 sockets while
    Ray starts, and one of them took HAProxy's stats port in CI ("cannot bind
    socket (Address already in use)"). Ports between Ray's worker range and
    the ephemeral range are only ever bound on purpose.
    """
    ephemeral_from = ephemeral_range_start()
    if ephemeral_from is None or ephemeral_from <= FIXED_PORTS_FROM + 1:
        return free_port()
    rng = rng or random.Random()
    for _ in range(200):
        port = rng.randrange(FIXED_PORTS_FROM, ephemeral_from)
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    return free_port()


def ephemeral_range_start() -> int | None:
    """The first port of the kernel's ephemeral range (Linux), or None where it cannot be read."""
    try:
        with open(EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def side_ports(environ: Mapping[str, str], keys: Sequence[str]) -> dict[str, str]:
    """One port per env var in `keys`: the caller's where set, else distinct `reserved_free_port`s."""
    chosen: dict[str, str] = {}
    taken: set[int] = set()
    for key in keys:
        chosen[key] = environ.get(key) or str(reserved_free_port(taken))
        with contextlib.suppress(ValueError):
            taken.add(int(chosen[key]))
    return chosen
