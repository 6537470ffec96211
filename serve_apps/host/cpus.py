"""This machine's CPUs as Linux reports them (sysfs, the thread's affinity), and running a block on some of them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator

from serve_apps.host.cpu_split import LogicalCpu

SYS_CPU = "/sys/devices/system/cpu"
SYS_NODE = "/sys/devices/system/node"


def read_cpus() -> list[LogicalCpu]:
    """This thread's allowed CPUs with their cores and NUMA nodes (Linux sysfs); [] where unreadable."""
    node_of: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir(SYS_NODE):
            if entry.startswith("node") and entry[4:].isdigit():
                with open(f"{SYS_NODE}/{entry}/cpulist") as f:
                    for cpu in parse_cpulist(f.read()):
                        node_of[cpu] = int(entry[4:])
    cpus: list[LogicalCpu] = []
    try:
        for cpu in sorted(os.sched_getaffinity(0)):
            topology = f"{SYS_CPU}/cpu{cpu}/topology"
            with open(f"{topology}/core_id") as f:
                core = int(f.read())
            with open(f"{topology}/physical_package_id") as f:
                package = int(f.read())
            cpus.append(LogicalCpu(cpu, (package, core), node_of.get(cpu, 0)))
    except (OSError, ValueError):
        return []
    return cpus


def parse_cpulist(text: str) -> list[int]:
    """sysfs's "0-3,8" form."""
    ids: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            start, end = part.split("-")
            ids.extend(range(int(start), int(end) + 1))
        elif part:
            ids.append(int(part))
    return ids


@contextlib.contextmanager
def pinned(cpus: Collection[int] | None) -> Iterator[None]:
    """Run the block on `cpus` only (the calling thread: what it spawns inherits it), then restore."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
