"""Shared bits of the benchmarks: percentiles, the table, the --json line, a redis-server, server processes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_apps.host.ports import free_port as free_port  # re-exported for the bench scripts

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class MedianInterval:
    """The median of some per-round figures and a distribution-free interval around it."""

    low: float
    median: float
    high: float
    coverage: float  # the probability that [low, high] holds the true median


def median_interval(values: Sequence[float], confidence: float = 0.9) -> MedianInterval | None:
    """The median of `values` and the narrowest order-statistic interval with at least `confidence`.

    Sign-test interval: for n independent values, [x(k), x(n-k+1)] misses the
    true median with probability 2 * P(Binomial(n, 1/2) <= k - 1), whatever
    the values' distribution (a machine whose speed drifts between rounds has
    no known one). With too few values for `confidence`, the whole range and
    its own (lower) coverage.
    """
    if not values:
        return None
    xs = sorted(values)
    n = len(xs)
    median = (xs[(n - 1) // 2] + xs[n // 2]) / 2

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / (1 << n)

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return MedianInterval(xs[k - 1], median, xs[n - k], round(coverage(k), 3))


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))


def emit_json(figures: dict[str, Any]) -> None:
    """SPEC §5: with --json, one JSON object of the same figures on the last line."""
    print(json.dumps(figures, separators=(",", ":")))


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: run `make venv redis-server` (or `sh scripts/install-redis.sh`)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        # Loopback only: a benchmark machine may be reachable from elsewhere, and this Redis has no password.
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", tmp],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# ----------------------------------------------------------------- process sessions (Linux /proc)


def proc_stat(pid: int | str) -> tuple[str, list[str]]:
    """(command name, the fields after it) of /proc/PID/stat; OSError when the process is gone."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    name, _, rest = raw.partition(" (")[2].rpartition(")")
    return name, rest.split()


def session_members(sid: int) -> dict[int, str]:
    """Live processes of session `sid`, by pid, with their names.

    A command started as the leader of its own session (`start_new_session`)
    keeps every process it spawns in that session, Ray's included (Ray puts
    each worker in a process group of its own, so `killpg` misses them), even
    after they are reparented to init.
    """
    members: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            name, fields = proc_stat(entry)
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            members[int(entry)] = name
    return members


def signal_session(sid: int, signum: int) -> None:
    for pid in session_members(sid):
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


def kill_session(sid: int) -> None:
    signal_session(sid, signal.SIGKILL)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes have used so far (those still alive)."""
    ticks = 0
    for pid in pids:
        try:
            _, fields = proc_stat(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def process(name: str, argv: Sequence[str], env: dict[str, str] | None = None, unset: Sequence[str] = (),
            cpus: Collection[int] | None = None, ready: str | None = None,
            ready_timeout_s: float = 300.0) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server as the leader of a new session, stdout+stderr to a temp log; always stop all of it.

    `cpus`: the CPUs it may run on (default: this process's). `ready`: wait
    until this text appears in its output before handing it over. On an error
    the log's tail is printed. Stopping sends SIGTERM to its process group and
    then SIGKILL to whatever is left in its session: Ray puts each worker in a
    process group of its own, so the process group alone would leave them.
    """
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    with tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False) as logf:
        log_path = Path(logf.name)
        proc = subprocess.Popen(list(argv), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, start_new_session=True, cwd=ROOT,
                                preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    try:
        if ready is not None:
            deadline = time.monotonic() + ready_timeout_s
            while ready not in log_path.read_text(errors="replace"):
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with code {proc.returncode} before it was ready")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not print {ready!r} within {ready_timeout_s:.0f} s")
                time.sleep(0.5)
        yield proc
    except BaseException:
        tail = log_path.read_text(errors="replace")[-3000:]
        log(f"--- last lines of the {name} log ({log_path}) ---\n{tail}")
        raise
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        kill_session(proc.pid)
        if proc.poll() is None:
            proc.wait(timeout=5)
        log_path.unlink(missing_ok=True)
