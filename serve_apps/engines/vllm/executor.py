"""vLLM's multiprocess executor for CPU engines, without most of its busy wait for the workers' results.

On CPU, vLLM always runs the model in worker processes (OpenMP needs them)
and its engine-core process waits for each step's result on a shared-memory
queue. While results arrived in the last second, that wait spins on
`sched_yield()` instead of sleeping: on a GPU node it saves microseconds per
step and costs one of many cores. On a CPU node it keeps one CPU 100% busy
for as long as anything is generating, and with packserve's CPU split
(serve_apps/host/cpu_split.py) that is the serving CPU: the CPU the gateway,
HAProxy, the model replica that streams the tokens out, Redis and often the
client need for every token. py-spy on a 2-core machine: the engine core
spent its whole step in `SpinCondition.wait`, and a client on that CPU
sometimes got its whole answer in one burst at the end (bench/RESULTS.md,
bench/serving_paired.py).

Instead, the engine core sleeps in a zmq poll until the worker's
notification arrives (vLLM sends one with every result), and spins only from
shortly before the result is due (serve_apps/engines/vllm/step_pacer.py). A
sleep for the whole step wakes late: the notification crosses two zmq I/O
threads and, in a VM, a halted vCPU. Paced, a stream runs as fast as with
vLLM's spin while the engine core uses a small fraction of a CPU instead of
all of one (bench/engine_wait.py; figures in bench/RESULTS.md).

The notification is not reliable on its own either: with the spin off, an
engine core on a 2-core machine once waited for ever for a result its worker
had already written (py-spy: both idle in `Poller.poll`) after the session
had been paused with SIGSTOP. With vLLM's spin a lost notification costs
nothing, because the spin re-reads the queue; here each sleep lasts at most
`POLL_MS`, so a lost notification costs at most that, and the queue is
re-read after every wake-up.

vLLM loads this class inside the engine-core process (the engine config
names it, `distributed_executor_backend`), so the change lives there and
nowhere else. GPU engines keep vLLM's own executor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from serve_apps.engines.vllm import compat
from serve_apps.engines.vllm.step_pacer import StepPacer

# vLLM's executor (a private module); compat lists what this subclass relies on.
MultiprocExecutor = compat.multiproc_executor()


def pace_reads(condition: Any, pacer: StepPacer, clock: Callable[[], float] = time.monotonic) -> None:
    """Make a vLLM `SpinCondition` reader sleep until `pacer` says the result is nearly due, then spin.

    vLLM 0.32: `wait()` spins on `sched_yield()` for `busy_loop_s` after each
    read, else polls its zmq notification socket for `timeout_ms` (None: for
    ever); its caller re-reads the queue after every return and calls
    `record_read()` after each read.
    """
    condition.busy_loop_s = 0.0
    wait = condition.wait
    record_read = condition.record_read

    def paced_wait(timeout_ms: int | None = None) -> None:
        sleep_ms = pacer.sleep_ms(clock())
        if sleep_ms == 0:
            os.sched_yield()
            return
        wait(timeout_ms=sleep_ms if timeout_ms is None else min(timeout_ms, sleep_ms))

    def paced_record_read() -> None:
        record_read()
        pacer.read(clock())

    condition.wait = paced_wait
    condition.record_read = paced_record_read


class SleepingMultiprocExecutor(MultiprocExecutor):  # type: ignore[misc,valid-type]
    """`MultiprocExecutor` whose engine core sleeps while a step runs in the workers and spins only near its end."""

    def _init_executor(self) -> None:
        # Set first: the workers are started and loaded through collective_rpc.
        self._pacer = StepPacer()
        super()._init_executor()

    def _post_init_executor(self) -> None:
        super()._post_init_executor()
        for queue in self.response_mqs:
            pace_reads(compat.spin_condition(queue), self._pacer)

    def collective_rpc(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # One call in flight at a time on CPU (vLLM turns async scheduling off there). With several
        # (pipeline parallelism) only the latest is timed: predictions come out short, and the
        # spin, bounded by StepPacer.spin_after_s, starts early; nothing waits longer than POLL_MS.
        self._pacer.dispatched(step_kind(method, kwargs.get("args", ())), time.monotonic())
        return super().collective_rpc(method, *args, **kwargs)


def step_kind(method: str | Callable[..., Any], args: tuple[Any, ...]) -> str:
    """What makes two worker calls last about as long: the method, and for a forward pass its token count.

    execute_model (the forward pass) and sample_tokens differ by two orders of
    magnitude; a forward pass costs about the same for the same number of
    tokens (a prefill of a few hundred tokens is several decode steps long),
    so its token count is bucketed by powers of two.
    """
    if not isinstance(method, str):
        return ""
    tokens = getattr(args[0], "total_num_scheduled_tokens", None) if args else None
    if not isinstance(tokens, int) or tokens <= 0:
        return method
    return f"{method}/{1 << (tokens - 1).bit_length()}"
