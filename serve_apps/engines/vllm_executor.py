"""vLLM's multiprocess executor for CPU engines, without its busy wait for the workers' results.

On CPU, vLLM always runs the model in worker processes (OpenMP needs them)
and its engine-core process waits for each step's result on a shared-memory
queue. While results arrived in the last second, that wait spins on
`sched_yield()` instead of sleeping: on a GPU node it saves microseconds per
step and costs one of many cores. On a CPU node it keeps one CPU 100% busy
for as long as anything is generating, and with packserve's CPU split
(serve_apps/cpu_split.py) that is the serving CPU: the CPU the gateway,
HAProxy, the model replica that streams the tokens out, Redis and often the
client need for every token. py-spy on a 2-core machine: the engine core
spent its whole step in `SpinCondition.wait`, and a client on that CPU
sometimes got its whole answer in one burst at the end (bench/RESULTS.md,
"Serving", eighth session).

Without the spin, the engine core sleeps in a zmq poll until the worker's
notification arrives (vLLM sends one with every result). That wake-up alone
is not reliable: with the spin off, an engine core on a 2-core machine once
waited for ever for a result its worker had already written (py-spy: both
idle in `Poller.poll`) after the session had been paused with SIGSTOP. With
vLLM's spin a lost notification costs nothing, because the spin re-reads the
queue; here each sleep lasts at most `POLL_MS`, so a lost notification costs
at most that, and the queue is re-read after every wake-up. Measured on
that machine: the engine core's CPU time fell from 8-10 to 0-1 ticks per
100 ms of generation.

vLLM loads this class inside the engine-core process (the engine config
names it, `distributed_executor_backend`), so the change lives there and
nowhere else. GPU engines keep vLLM's own executor.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.executor.multiproc_executor import MultiprocExecutor

POLL_MS = 2


def sleep_between_reads(condition: Any, poll_ms: int = POLL_MS) -> None:
    """Make a vLLM `SpinCondition` reader sleep (at most `poll_ms` at a time) instead of spinning.

    vLLM 0.32: `wait()` spins on `sched_yield()` for `busy_loop_s` after each
    read, else polls its zmq notification socket for `timeout_ms` (None: for
    ever); its caller re-reads the queue after every return.
    """
    condition.busy_loop_s = 0.0
    wait = condition.wait

    def bounded_wait(timeout_ms: int | None = None) -> None:
        wait(timeout_ms=poll_ms if timeout_ms is None else min(timeout_ms, poll_ms))

    condition.wait = bounded_wait


class SleepingMultiprocExecutor(MultiprocExecutor):
    """`MultiprocExecutor` whose engine core sleeps, not spins, while a step runs in the workers."""

    def _post_init_executor(self) -> None:
        super()._post_init_executor()
        for queue in self.response_mqs:
            sleep_between_reads(queue._spin_condition)
