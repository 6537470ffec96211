"""Models at zero replicas: their warm flags, and the wait for one to start before admission.

An engine that can scale to zero (the Ray Serve handle engine) says whether
its model is warm without waiting, and starts it on `ensure_ready`; in-process
engines are always warm (the `Engine` defaults). The wait comes before
admission, so it is never charged and holds no slot or queue place.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping

from starlette.requests import Request

from serve_apps.engines.types import Engine, ModelCard
from serve_apps.gateway import errors
from serve_apps.gateway.disconnect import unless_disconnected
from serve_apps.gateway.metrics import Metrics

log = logging.getLogger("packserve.gateway")

DEFAULT_COLD_START_TIMEOUT_S = 600.0


class ColdStarts:
    def __init__(self, engines: Mapping[str, Engine], cards: Mapping[str, ModelCard], metrics: Metrics,
                 timeout: Callable[[str], float] | None = None) -> None:
        self.engines = engines
        self.cards = cards
        self.metrics = metrics
        self.timeout = timeout or (lambda _model: DEFAULT_COLD_START_TIMEOUT_S)
        # Requests waiting for a cold start, in all and per model: a cold model with waiters is starting.
        self.waiting = 0
        self.starting: collections.Counter[str] = collections.Counter()

    def is_warm(self, card: ModelCard) -> bool:
        return self.engines[card.id].is_warm(card.id)

    def warm_flags(self) -> dict[str, bool]:
        return {cid: self.is_warm(card) for cid, card in self.cards.items()}

    async def start(self, model: str) -> bool | None:
        """Start `model` ahead of traffic: True if it was warm already, False if starting, None if unknown."""
        card = self.cards.get(model)
        if card is None:
            return None
        return await self.engines[card.id].ensure_ready(card.id, 0)

    async def wait(self, request: Request, card: ModelCard) -> None:
        """Return once `card`'s model is warm; 503 past its cold-start timeout, 499 if the client leaves."""
        if self.is_warm(card):
            return
        timeout_s = self.timeout(card.id)
        started = time.monotonic()
        self.waiting += 1
        self.starting[card.id] += 1
        try:
            ready = await unless_disconnected(request, self.engines[card.id].ensure_ready(card.id, timeout_s))
        finally:
            self.waiting -= 1
            self.starting[card.id] -= 1
        waited_s = time.monotonic() - started
        outcome = "client_closed" if ready is None else "ready" if ready else "timeout"
        self.metrics.cold_start_wait.labels(card.id, outcome).observe(waited_s)
        log.info("cold start wait", extra={"model": card.id, "ready": ready, "waited_ms": int(waited_s * 1000)})
        if ready is None:
            raise errors.client_closed("while the model was starting")
        if not ready:
            raise errors.cold_start_timeout(card.id, timeout_s)
