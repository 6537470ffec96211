"""When a vLLM engine core should spin for its workers' result, and how long it may sleep before that.

A CPU engine core that spins for the whole of every step takes a CPU from
everything else on it (serve_apps/engines/vllm/executor.py). One that sleeps
for the whole step wakes late: the worker's zmq notification crosses two I/O
threads, and in a VM a halted vCPU first has to be woken by the host. On a
small CPU machine that lateness was the whole gap between packserve's
single-stream throughput and vLLM's own server's (bench/RESULTS.md,
bench/engine_wait.py).

Calls of one kind last about as long as the last few did (a forward pass of
a given number of tokens costs about the same each time), so the engine core
sleeps until `spin_before_s` before the result is due and spins from then
on, for at most `spin_after_s` past the due time (a longer step than
predicted: the notification wakes it then). 2 ms before, because zmq polls
in whole milliseconds and a wake-up can come a millisecond late; paced this
way a stream runs as fast as with the spin. Pure policy: the caller passes
the time in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Longest single sleep: the notification is not reliable (serve_apps/engines/vllm/executor.py),
# so a sleeper re-reads the queue at least this often.
POLL_MS = 2


@dataclass
class StepPacer:
    """Predicts when each dispatched call's result is due from the last calls of the same kind."""

    spin_before_s: float = 0.002
    spin_after_s: float = 0.002
    history: int = 8
    _durations: dict[str, deque[float]] = field(default_factory=dict)
    _pending: tuple[str, float] | None = None

    def dispatched(self, kind: str, now: float) -> None:
        """A call of `kind` (the worker method, with its size) was sent to the workers at `now`."""
        self._pending = (kind, now)

    def read(self, now: float) -> None:
        """A result was read at `now`: the pending call took `now - dispatch` seconds."""
        if self._pending is None:
            return
        kind, sent = self._pending
        self._pending = None
        self._durations.setdefault(kind, deque(maxlen=self.history)).append(now - sent)

    def due(self) -> float | None:
        """When the pending call's result is expected, or None (nothing pending, or no history for its kind)."""
        if self._pending is None:
            return None
        kind, sent = self._pending
        past = self._durations.get(kind)
        if not past:
            return None
        # The lower quartile: steps of one kind vary with the batch, and
        # starting to spin a little early is cheaper than waking late.
        return sent + sorted(past)[len(past) // 4]

    def sleep_ms(self, now: float) -> int:
        """How long to sleep before the next look at the queue; 0 means spin (look again at once)."""
        due = self.due()
        if due is None or now > due + self.spin_after_s:
            return POLL_MS
        until_spin = due - self.spin_before_s - now
        # zmq polls in whole milliseconds; under one, spinning is cheaper than a late wake-up.
        if until_spin < 0.001:
            return 0
        return min(POLL_MS, int(until_spin * 1000))
