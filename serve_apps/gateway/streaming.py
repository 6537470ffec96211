"""Turning a metered chunk stream into an SSE response.

The first chunk arrives already pulled (`GatewayService.dispatch`), so a
model that fails before its first token gets a proper HTTP error (and the
request-bar refund) instead of a 200 followed by an error event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.responses import StreamingResponse

from serve_apps.engines.types import EngineError, GenerationChunk

log = logging.getLogger("packserve.gateway")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class SseEvents:
    """One API's events of one streamed answer (lines of `data:` / `event:` text)."""

    start: Callable[[], list[str]]
    chunk: Callable[[GenerationChunk], list[str]]
    finish: Callable[[], list[str]]
    fail: Callable[[str], str]


def sse_response(first: GenerationChunk | None, chunks: AsyncIterator[GenerationChunk], events: SseEvents,
                 headers: dict[str, str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        # What one engine chunk produces goes out as one write: a Responses delta is preceded by up to four
        # framing events, and a send per event costs the event loop more than the encoding does.
        opening = events.start()
        try:
            if first is not None:
                opening += events.chunk(first)
            if opening:
                yield "".join(opening)
            async for chunk in chunks:
                lines = events.chunk(chunk)
                if lines:
                    yield "".join(lines)
        except EngineError as exc:
            log.warning("engine failed mid-stream", extra={"error": str(exc)})
            yield events.fail("The model failed while generating; you are charged only for tokens produced.")
            return
        closing = events.finish()
        if closing:
            yield "".join(closing)

    return StreamingResponse(body(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
