"""OpenAI Responses API route: POST /responses (thin: parse, convert, hand to the service, encode).

The same request story as chat completions (authenticate, resolve, admit,
dispatch, stream, settle), so a Responses request costs exactly what the
same chat request costs; only the wire format differs. Nothing is stored,
so there is no `GET /responses/{id}`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from serve_apps.engines.types import EngineError
from serve_apps.gateway.body import parse
from serve_apps.gateway.errors import ApiError
from serve_apps.gateway.service import GatewayService, new_request_id
from serve_apps.gateway.streaming import sse_response
from serve_apps.protocols import responses_convert as convert
from serve_apps.protocols.common import InvalidRequest
from serve_apps.protocols.responses_models import ResponsesRequest, validation_message
from serve_apps.protocols.responses_stream import ResponsesStreamEncoder

# The `protocol` of metrics and usage records: which API a request came through.
PROTOCOL = "responses"


def build_responses_router(service: GatewayService, max_body_bytes: int) -> APIRouter:
    router = APIRouter()

    @router.post("/responses")
    async def responses(request: Request) -> Response:
        body = await parse(request, ResponsesRequest, max_body_bytes, validation_message)
        principal = await service.authenticate(request)
        card = service.resolve(body.model, kind="chat")
        rid = new_request_id("resp", "_")
        try:
            gen = convert.responses_to_generation(body, rid, card)
        except InvalidRequest as exc:
            raise ApiError(400, exc.message, "invalid_request", exc.param) from None
        echo = convert.response_echo(body)
        dispatched = await service.dispatch(request, principal, card, gen, PROTOCOL)
        headers = service.headers(dispatched.ticket)
        created = int(time.time())
        if body.stream:
            enc = ResponsesStreamEncoder(echo, rid, created)
            return sse_response(dispatched.first, dispatched.chunks, enc.start, enc.chunk,
                                lambda: enc.finish(completed_at=int(time.time())), enc.fail, headers)
        try:
            result = await service.collect_from(dispatched)
        except EngineError:
            raise ApiError(502, "The model failed while generating.", "engine_error") from None
        return JSONResponse(convert.responses_response(result, echo, response_id=rid, created_at=created,
                                                       completed_at=int(time.time())), headers=headers)

    return router
