"""Model capacity for one process: the embedded store's twin of cluster/lua/cap_*.lua.

The same state and steps as the Lua scripts (see capacity.lua for the key
schema it mirrors), held in memory: the embedded store serves one gateway
process, and capacity state (who runs, who waits) does not outlive it. The
ordering rules are the pure functions of policies.fairness, as in Lua.
Callers hold the store's lock, so each method is one atomic step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cluster.store import (
    AccountLoad,
    CapacityGone,
    CapacityGranted,
    CapacityOutcome,
    CapacityStats,
    CapacityTerms,
    CapacityWaiting,
)
from policies.fairness import Waiting, dispatch_allows, lift, pick, preemption_victim


@dataclass
class _Model:
    run: dict[str, int] = field(default_factory=dict)  # entry -> lease expiry ms
    owner: dict[str, str] = field(default_factory=dict)  # entry -> account
    wait: dict[str, int] = field(default_factory=dict)  # entry -> arrival sequence
    wexp: dict[str, int] = field(default_factory=dict)  # entry -> waiter expiry ms
    act: dict[str, int] = field(default_factory=dict)  # account -> entries waiting or running
    vtc: dict[str, int] = field(default_factory=dict)  # account -> counter
    paid: dict[str, int] = field(default_factory=dict)  # entry -> counter units added
    pre: dict[str, str] = field(default_factory=dict)  # entry -> account whose sequence is paused for it
    seq: int = 0
    last: int | None = None
    capacity: int = 0
    paused: str | None = None  # account whose sequence is paused while the model is one over capacity


class CapacityBook:
    """`granted(model, entry)` is called for every dispatched waiter (the store wakes it)."""

    def __init__(self, granted: Callable[[str, str], None]) -> None:
        self._models: dict[str, _Model] = {}
        self._granted = granted

    def _model(self, name: str) -> _Model:
        return self._models.setdefault(name, _Model())

    def acquire(self, terms: CapacityTerms, account_id: str, entry_id: str, wait_ttl_ms: int,
                now: int, *, join: bool = True) -> CapacityOutcome:
        m = self._model(terms.model)
        self._expire(m, now)
        if entry_id in m.run:
            return CapacityGranted(m.run[entry_id], m.pre.get(entry_id))
        if entry_id not in m.wait and not join:
            return CapacityGone()
        if entry_id not in m.wait:
            self._activate(m, account_id)
            m.owner[entry_id] = account_id
            m.seq += 1
            m.wait[entry_id] = m.seq
        m.wexp[entry_id] = now + wait_ttl_ms
        self._fill(m, terms, now, caller=entry_id)
        if entry_id in m.run:
            return CapacityGranted(m.run[entry_id], m.pre.get(entry_id))
        return CapacityWaiting(len(m.wait), min(m.run.values()) if m.run else None)

    def renew(self, terms: CapacityTerms, entry_id: str, counter_total: int, now: int) -> bool:
        m = self._model(terms.model)
        self._expire(m, now)
        renewed = entry_id in m.run
        if renewed:
            m.run[entry_id] = now + terms.lease_ttl_ms
            self._charge(m, entry_id, m.owner[entry_id], counter_total)
        self._fill(m, terms, now)
        return renewed

    def release(self, terms: CapacityTerms, entry_id: str, counter_total: int, now: int) -> bool:
        m = self._model(terms.model)
        account = m.owner.get(entry_id)
        removed = False
        if account is not None:
            self._charge(m, entry_id, account, counter_total)
            removed = m.run.pop(entry_id, None) is not None
            removed = m.wait.pop(entry_id, None) is not None or removed
            m.wexp.pop(entry_id, None)
            self._forget(m, entry_id)
        self._expire(m, now)
        self._fill(m, terms, now)
        return removed

    def stats(self, terms: CapacityTerms, now: int) -> CapacityStats:
        m = self._model(terms.model)
        self._expire(m, now)
        self._fill(m, terms, now)
        running, waiting = _per_account(m, m.run), _per_account(m, m.wait)
        loads = [AccountLoad(a, m.vtc.get(a, 0), running.get(a, 0), waiting.get(a, 0)) for a in m.act]
        return CapacityStats(terms.model, terms.capacity, len(m.run), len(m.wait), _by_counter(loads))

    def forget_account(self, account_id: str) -> None:
        """A deleted account's counters go; one with entries still waiting or running keeps them until they leave."""
        for m in self._models.values():
            if account_id not in m.act:
                m.vtc.pop(account_id, None)

    # -- the steps of capacity.lua ------------------------------------------------

    @staticmethod
    def _activate(m: _Model, account: str) -> None:
        if account not in m.act:
            m.vtc[account] = lift(m.vtc.get(account, 0), [m.vtc.get(a, 0) for a in m.act], m.last)
        m.act[account] = m.act.get(account, 0) + 1

    @staticmethod
    def _charge(m: _Model, entry: str, account: str, total: int) -> None:
        paid = m.paid.get(entry, 0)
        if total > paid:
            m.vtc[account] = m.vtc.get(account, 0) + total - paid
            m.paid[entry] = total

    @staticmethod
    def _forget(m: _Model, entry: str) -> None:
        account = m.owner.pop(entry, None)
        m.paid.pop(entry, None)
        m.pre.pop(entry, None)
        if account is not None:
            m.act[account] -= 1
            if m.act[account] <= 0:
                del m.act[account]
                m.last = m.vtc.get(account, 0)

    def _expire(self, m: _Model, now: int) -> None:
        for entry in [e for e, expires in m.run.items() if expires <= now]:
            del m.run[entry]
            self._forget(m, entry)
        for entry in [e for e, expires in m.wexp.items() if expires <= now]:
            m.wait.pop(entry, None)
            del m.wexp[entry]
            self._forget(m, entry)

    def _fill(self, m: _Model, terms: CapacityTerms, now: int, caller: str | None = None) -> None:
        m.capacity = terms.capacity
        preempt = terms.preempts
        paused = None
        if len(m.run) <= terms.capacity:
            paused = m.paused if len(m.run) == terms.capacity else None
            m.paused = None
        while m.wait:
            full = not dispatch_allows(len(m.run), terms.capacity)
            if full and (not preempt or len(m.run) > terms.capacity):
                return
            chosen = pick((Waiting(seq, m.owner[e]) for e, seq in m.wait.items()), m.vtc, terms.mode, m.act)
            assert chosen is not None
            entry = next(e for e, seq in m.wait.items() if seq == chosen.seq)
            if full:
                victim = preemption_victim(chosen.account_id, m.vtc, m.act, _per_account(m, m.run), paused)
                if victim is None:
                    return
                m.pre[entry] = m.paused = victim
            del m.wait[entry]
            m.wexp.pop(entry, None)
            m.run[entry] = now + terms.lease_ttl_ms
            if entry != caller:  # the caller learns of its own grant from the reply
                self._granted(terms.model, entry)


def _per_account(m: _Model, entries: Iterable[str]) -> dict[str, int]:
    """Entries per account (of `m.run`: sequences running; of `m.wait`: requests waiting)."""
    count: dict[str, int] = {}
    for entry in entries:
        count[m.owner[entry]] = count.get(m.owner[entry], 0) + 1
    return count


def _by_counter(loads: list[AccountLoad]) -> tuple[AccountLoad, ...]:
    return tuple(sorted(loads, key=lambda load: (load.counter, load.account_id)))
