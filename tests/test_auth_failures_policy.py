"""policies.auth_failures: the fixed-window rule both stores implement (Lua twin: cluster/lua/auth_failures.lua)."""

from __future__ import annotations

import pytest

from policies.auth_failures import AuthFailures, AuthVerdict, record_failure


@pytest.mark.parametrize(("prev", "now", "limit", "state", "verdict"), [
    (None, 60_000, 2, AuthFailures(1, 1), AuthVerdict(1, False, 60_000)),
    (AuthFailures(1, 1), 61_000, 2, AuthFailures(1, 2), AuthVerdict(2, False, 59_000)),
    (AuthFailures(1, 2), 119_999, 2, AuthFailures(1, 3), AuthVerdict(3, True, 1)),
    (AuthFailures(1, 9), 120_000, 2, AuthFailures(2, 1), AuthVerdict(1, False, 60_000)),  # a new window
    (AuthFailures(0, 9), 120_000, 2, AuthFailures(2, 1), AuthVerdict(1, False, 60_000)),  # an old one
])
def test_fixed_window(prev: AuthFailures | None, now: int, limit: int, state: AuthFailures,
                      verdict: AuthVerdict) -> None:
    assert record_failure(prev, now, limit, 60_000) == (state, verdict)


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        record_failure(None, 0, 0)
