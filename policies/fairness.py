"""Fair dispatch of one saturated model across accounts: virtual token counters (SPEC §4), pure.

VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024,
arXiv 2401.00588): each account has, per model, a counter of the service it
received divided by its weight. When the model has a free sequence, the next
request dispatched is the oldest waiting request of the waiting account with
the lowest counter. Contract and invariants:

- Service is counted in tokens the engine processed, weighted as the paper
  weights them: INPUT_WEIGHT per prompt token, OUTPUT_WEIGHT per output token
  (w_p = 1, w_q = 2). Not the bar's prices: the scheduler shares the engine's
  time, and the same tokens cost the engine the same whoever sends them, while
  prices differ by plan (payg pays list price, subscriptions get a cache
  discount) and would make two accounts' equal use count differently.
- An account's weight is its number of packs (1 to 5); payg accounts get an
  operator-set weight (1 to MAX_WEIGHT, default 1).
- Counters are exact integers: a counter holds service × WEIGHT_SCALE / weight,
  and WEIGHT_SCALE is lcm(1..MAX_WEIGHT), so the division is exact for every
  allowed weight. With WEIGHT_SCALE = 2520 a counter stays below 2^53 (exact in
  Redis Lua's doubles) for 1.7e12 weighted tokens of one weight-1 account on
  one model.
- Lift on return: an account that becomes active (it had nothing waiting or
  running on the model) has its counter raised to the lowest counter among the
  accounts that are active, or, when none is, to the counter of the account
  that left last; idle time is never banked. A counter never goes down.
- Ties: the lower arrival sequence wins (the older request), then the account
  id, so the order is total and the same in every store.
- `fifo` (for comparison) dispatches in arrival order only; counters still grow.
- Work-conserving: a request is held back only while the model runs
  `capacity` sequences (see `dispatch_allows`).
- Preemption (fair only; a setting, on by default): when the model is full
  and the next request in fair order belongs to an account with nothing
  running on it, one sequence of an account that holds at least
  MIN_VICTIM_RUNNING of them and stands after the waiter in fair order is
  paused in the engine; it then waits in fair order for a free sequence
  (see `preemption_victim`). Without it a returning account waits for the
  next running answer to end, however far below the others its counter is.

cluster/lua/fairness.lua implements `lift`, `pick` and `preemption_victim`;
tests/test_fairness.py runs one table against both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from math import lcm

INPUT_WEIGHT = 1
OUTPUT_WEIGHT = 2
MAX_WEIGHT = 10
WEIGHT_SCALE = lcm(*range(1, MAX_WEIGHT + 1))  # 2520
MAX_PACK_WEIGHT = 5
# An account running a single sequence is never paused: it would stop making progress altogether.
MIN_VICTIM_RUNNING = 2


class SchedulerMode(StrEnum):
    FAIR = "fair"
    FIFO = "fifo"


def service_units(prompt_tokens: int, completion_tokens: int) -> int:
    """The service a response received so far, in weighted tokens."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    return prompt_tokens * INPUT_WEIGHT + completion_tokens * OUTPUT_WEIGHT


def check_weight(weight: int) -> int:
    if not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"a fairness weight must be an integer from 1 to {MAX_WEIGHT}, not {weight!r}")
    return weight


def counter_units(service: int, weight: int) -> int:
    """What `service` weighted tokens add to the counter of an account of `weight`: exact."""
    if service < 0:
        raise ValueError("service cannot be negative")
    return service * (WEIGHT_SCALE // check_weight(weight))


def account_weight(packs: int | None, payg_weight: int) -> int:
    """Packs for a subscription (1 to 5), the operator's payg weight for payg (`packs=None`)."""
    if packs is None:
        return check_weight(payg_weight)
    if not 1 <= packs <= MAX_PACK_WEIGHT:
        raise ValueError(f"a subscription has 1 to {MAX_PACK_WEIGHT} packs, not {packs}")
    return packs


def lift(counter: int, active_counters: Iterable[int], last_departed: int | None) -> int:
    """The counter of an account that becomes active: never below the active accounts' lowest.

    With nobody active, the floor is the counter of the account that left
    last (None: nobody yet, no floor).
    """
    active = list(active_counters)
    if active:
        return max(counter, min(active))
    if last_departed is not None:
        return max(counter, last_departed)
    return counter


@dataclass(frozen=True)
class Waiting:
    """A waiting request: its arrival sequence on the model and its account."""

    seq: int
    account_id: str


def pick(waiting: Iterable[Waiting], counters: Mapping[str, int], mode: SchedulerMode,
         active: Mapping[str, int] | None = None) -> Waiting | None:
    """The request to dispatch next, or None when nothing waits.

    fair: the oldest request of the account with the lowest counter (an
    account with no counter yet counts 0); at equal counters, the account
    with fewer requests waiting or running on the model (`active`, absent =
    0), then the older request. The middle rule matters when an account
    comes back: it is lifted to the lowest active counter, so it ties with
    an account that kept requests queued, and the tie goes to the one
    holding less of the model instead of to the older queue. fifo: the
    oldest request.
    """
    fair = mode is SchedulerMode.FAIR
    held = active or {}
    best: Waiting | None = None
    best_key: tuple[int, int, int, str] | None = None
    for w in waiting:
        counter = counters.get(w.account_id, 0) if fair else 0
        key = (counter, held.get(w.account_id, 0) if fair else 0, w.seq, w.account_id)
        if best_key is None or key < best_key:
            best, best_key = w, key
    return best


def dispatch_allows(in_flight: int, capacity: int) -> bool:
    """A free sequence on the model."""
    return in_flight < capacity


def preemption_victim(waiter: str, counters: Mapping[str, int], active: Mapping[str, int],
                      running: Mapping[str, int], paused: str | None = None) -> str | None:
    """The account one of whose running sequences is paused for `waiter`'s request, or None.

    Called only when the model is full and `waiter`'s request is next in
    fair order. `running` maps accounts to their sequences running on the
    model (a paused one counts: it is still dispatched), `active` to their
    requests waiting or running (absent = 0).

    A new pause (`paused` None): the waiter must have nothing running; a
    victim runs at least MIN_VICTIM_RUNNING sequences and stands strictly
    after the waiter by `pick`'s key (counter, then requests held). Of those,
    the one furthest behind in fair order: highest counter, then most
    requests held, then the highest account id, so every store picks the same.

    `paused` names the account whose sequence is paused and would take the
    sequence that has just freed. That sequence waits in fair order like any
    request: the waiter goes first, and the pause goes on (the answer is
    `paused` again), only if it stands strictly before `paused`'s account,
    whether or not it has sequences running, and `paused` still runs
    MIN_VICTIM_RUNNING or more.
    """

    def key(account: str) -> tuple[int, int]:
        return counters.get(account, 0), active.get(account, 0)

    if paused is not None:
        goes_first = paused != waiter and key(waiter) < key(paused)
        return paused if goes_first and running.get(paused, 0) >= MIN_VICTIM_RUNNING else None
    if running.get(waiter, 0) > 0:
        return None
    behind = [account for account, n in running.items()
              if account != waiter and n >= MIN_VICTIM_RUNNING and key(account) > key(waiter)]
    return max(behind, key=lambda account: (*key(account), account), default=None)
