"""Invalid-key limiter at the gateway: a source address that keeps presenting bad keys gets 429.

Every failed authentication (a missing, unknown or revoked key) is counted
per source address in the store (one Lua script on Redis, so every gateway
shares the count; in-process on the embedded store). Past the limit within
the minute, the answer is 429 `too_many_auth_failures` with Retry-After
instead of 401. A valid key is never counted nor refused, even from a
refused address: offices and NAT gateways share addresses, and with 256-bit
keys guessing is hopeless anyway; what the limit bounds is the store work and
log noise a key-guessing or misconfigured client causes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.requests import Request

from cluster.store import Store, StoreError
from policies.auth_failures import DEFAULT_WINDOW_MS
from policies.bars import ceil_seconds
from serve_apps.gateway.errors import ApiError, invalid_api_key, too_many_auth_failures

log = logging.getLogger("packserve.gateway")


def source_address(request: Request) -> str:
    """The peer address as the server saw it (behind a proxy: uvicorn's --proxy-headers sets it)."""
    return request.client.host if request.client is not None else "unknown"


class AuthFailureGuard:
    def __init__(self, store: Store, per_minute: int, window_ms: int = DEFAULT_WINDOW_MS,
                 clock: Callable[[], int | None] = lambda: None) -> None:
        self.store = store
        self.clock = clock  # None: the store's own clock (Redis TIME), so gateways agree on the window
        self.limit = per_minute
        self.window_ms = window_ms

    async def failed(self, request: Request, message: str) -> ApiError:
        """Count one failure from the request's source; the error to answer with (401, or 429 past the limit)."""
        source = source_address(request)
        try:
            verdict = await self.store.record_auth_failure(source, self.limit, self.window_ms, self.clock())
        except StoreError as exc:
            # The count is protection, not a gate: without the store the request is still a plain 401.
            log.warning("auth failure not counted: store unavailable", extra={"error": str(exc)})
            return invalid_api_key(message)
        if not verdict.refused:
            return invalid_api_key(message)
        if verdict.failures == self.limit + 1:
            log.warning("source refused after repeated invalid API keys",
                        extra={"source": source, "failures": verdict.failures, "limit": self.limit})
        retry_s = max(1, ceil_seconds(verdict.retry_after_ms))
        return too_many_auth_failures(verdict.failures, self.limit, retry_s)
