"""Which running sequence an engine pauses for a request dispatched over a full model (scheduler.preempt).

The fair scheduler names an account (`GenerationRequest.preempt`); each engine
keeps a `Seat` per sequence it runs and pauses the one `choose_victim` picks.
The paused sequence resumes at the next free sequence with its output so far
as a prompt suffix, which the prefix cache mostly holds, so only the
requests whose continuation is the same as their uninterrupted output are
candidates (`resumable`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from serve_apps.engines.types import GenerationRequest


@dataclass
class Seat:
    """A running sequence: whose, in which order it started (higher: younger), and whether it is paused."""

    request_id: str
    owner: str
    order: int
    resumable: bool = True
    paused: bool = False


S = TypeVar("S", bound=Seat)


def resumable(request: GenerationRequest) -> bool:
    """Whether a continuation from the output so far is the output the request would have had.

    Not with a seed (the sampler's random stream restarts), stop strings (one
    could straddle the cut), constrained output (its grammar state restarts)
    or presence/frequency penalties (they count output tokens only, and the
    output so far becomes prompt).
    """
    s = request.sampling
    return (s.seed is None and not s.stop and request.output_format is None
            and request.tool_choice in (None, "auto", "none")
            and s.presence_penalty == 0 and s.frequency_penalty == 0)


def choose_victim(seats: Iterable[S], preempt: str) -> S | None:
    """The youngest resumable sequence of `preempt` (least output to recompute), of those not paused.

    When this replica runs none of that account's (the scheduler counts the
    whole model, a router spread it), the youngest of the account running
    the most sequences here, if it runs two or more; else None.
    """
    candidates = [s for s in seats if s.resumable and not s.paused]
    named = [s for s in candidates if s.owner == preempt]
    if named:
        return max(named, key=lambda s: s.order)
    per_owner = Counter(s.owner for s in candidates)
    if not per_owner:
        return None
    busiest = max(per_owner, key=lambda owner: (per_owner[owner], owner))
    if per_owner[busiest] < 2:
        return None
    return max((s for s in candidates if s.owner == busiest), key=lambda s: s.order)
