"""The invalid-key limiter's rule: failed authentications per source address per fixed window.

A source that presents more than `limit` invalid keys within one window
(default: 30 a minute) is refused with 429 until the window ends. Windows are
fixed (`now_ms // window_ms`), so the state per source is two integers and
one atomic step updates it; cluster/lua/auth_failures.lua is this function's
Lua twin, and both stores pass the same contract tests.

Contract: `record_failure` counts the failure it is called for; the verdict
is `refused` once the count in the current window exceeds `limit`, and
`retry_after_ms` is the time left in the window (> 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.units import MINUTE_MS

DEFAULT_LIMIT = 30
DEFAULT_WINDOW_MS = MINUTE_MS
# Longer source strings are cut (an address is far shorter): a key name stays bounded.
MAX_SOURCE_LEN = 128


@dataclass(frozen=True)
class AuthFailures:
    window: int  # now_ms // window_ms of the last failure
    count: int  # failures in that window


@dataclass(frozen=True)
class AuthVerdict:
    failures: int
    refused: bool
    retry_after_ms: int


def record_failure(prev: AuthFailures | None, now_ms: int, limit: int,
                   window_ms: int = DEFAULT_WINDOW_MS) -> tuple[AuthFailures, AuthVerdict]:
    if limit < 1 or window_ms < 1:
        raise ValueError("limit and window_ms must be positive")
    window = now_ms // window_ms
    count = prev.count + 1 if prev is not None and prev.window == window else 1
    retry = (window + 1) * window_ms - now_ms
    return AuthFailures(window, count), AuthVerdict(count, count > limit, retry)
