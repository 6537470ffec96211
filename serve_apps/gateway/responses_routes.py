"""OpenAI Responses API route: POST /responses (thin: parse, hand to the service, encode).

The same request story as chat completions (`GatewayService.generate`), so a
Responses request costs exactly what the same chat request costs; only the
wire format differs. Nothing is stored, so there is no `GET /responses/{id}`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from serve_apps.engines.types import GenerationRequest, ModelCard
from serve_apps.gateway.body import parse
from serve_apps.gateway.service import GatewayService, new_request_id
from serve_apps.gateway.streaming import SseEvents
from serve_apps.protocols import responses_convert as convert
from serve_apps.protocols.common import GenerationResult
from serve_apps.protocols.responses_models import ResponsesRequest, validation_message
from serve_apps.protocols.responses_stream import ResponsesStreamEncoder

# The `protocol` of metrics and usage records: which API a request came through.
PROTOCOL = "responses"


@dataclass
class ResponsesCall:
    req: ResponsesRequest
    rid: str
    # What the answer repeats of the request; set with the generation, whose conversion refuses what it cannot.
    echo: convert.ResponseEcho | None = field(default=None, init=False)

    @property
    def model(self) -> str:
        return self.req.model

    @property
    def stream(self) -> bool:
        return bool(self.req.stream)

    def generation(self, card: ModelCard) -> GenerationRequest:
        gen = convert.responses_to_generation(self.req, self.rid, card)
        self.echo = convert.response_echo(self.req)
        return gen

    def _echo(self) -> convert.ResponseEcho:
        assert self.echo is not None, "generation() runs before the answer"
        return self.echo

    def events(self, created: int) -> SseEvents:
        enc = ResponsesStreamEncoder(self._echo(), self.rid, created)
        return SseEvents(enc.start, enc.chunk, lambda: enc.finish(completed_at=int(time.time())), enc.fail)

    def answer(self, result: GenerationResult, created: int) -> dict[str, Any]:
        return convert.responses_response(result, self._echo(), response_id=self.rid, created_at=created,
                                          completed_at=int(time.time()))


def build_responses_router(service: GatewayService, max_body_bytes: int) -> APIRouter:
    router = APIRouter()

    @router.post("/responses")
    async def responses(request: Request) -> Response:
        async def read() -> ResponsesCall:
            body = await parse(request, ResponsesRequest, max_body_bytes, validation_message)
            return ResponsesCall(body, new_request_id("resp", "_"))

        return await service.generate(request, PROTOCOL, read)

    return router
