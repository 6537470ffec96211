"""Which CPUs a node's vLLM CPU engines compute on, and which everything else of packserve keeps to.

vLLM's CPU backend pins each engine's OpenMP threads to CPUs of its own
choosing (`VLLM_CPU_OMP_THREADS_BIND=auto`, vLLM's default: on x86, one
logical CPU per physical core of the first NUMA node, minus the last one,
which it leaves for the engine-core process that schedules the steps). It
keeps nothing else off those CPUs. Every step is a parallel region that ends
at a barrier, so when any other process (Ray's GCS, raylet and agents, the
Serve controller, HAProxy, the gateway, the model replicas) is scheduled on
one of them, the whole step waits for it: on a small machine an idle local
Ray alone cost vLLM's own server more throughput than packserve's whole
budget (bench/ray_floor.py; figures in bench/RESULTS.md).

So on a node whose engines run on CPU, packserve computes the split itself,
the way vLLM's auto binding does, hands the engine CPUs to vLLM explicitly,
and starts Ray (hence every process of packserve) on the other CPUs.
This module is the pure part: the topology comes in as data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LogicalCpu:
    id: int
    # (physical package, core id): logical CPUs that share it are SMT siblings.
    core: tuple[int, int]
    numa_node: int = 0


@dataclass(frozen=True)
class CpuSplit:
    engine: tuple[int, ...]  # vLLM's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND)
    serving: tuple[int, ...]  # Ray, Serve, HAProxy, the gateway, model replicas, engine-core processes


def split(cpus: Sequence[LogicalCpu]) -> CpuSplit | None:
    """vLLM's x86 auto binding for one engine rank, and every other allowed CPU for the rest.

    None when there is nothing to split: fewer than two physical cores, where
    vLLM itself computes on every CPU it has.
    """
    if not cpus:
        return None
    first_node = min(c.numa_node for c in cpus)
    siblings: dict[tuple[int, int], list[int]] = {}
    for c in cpus:
        if c.numa_node == first_node:
            siblings.setdefault(c.core, []).append(c.id)
    # vLLM takes the highest-numbered sibling of each core, and reserves the
    # last core it picked for the engine-core process.
    picked = sorted(max(ids) for ids in siblings.values())
    if len(picked) < 2:
        return None
    engine = tuple(picked[:-1])
    serving = tuple(sorted(c.id for c in cpus if c.id not in engine))
    return CpuSplit(engine=engine, serving=serving)


def id_list(ids: Iterable[int]) -> str:
    """CPU ids as vLLM and taskset read them: "0-3,6"."""
    ordered = sorted(set(ids))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)
