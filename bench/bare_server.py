"""The simulated engine served bare over HTTP: the baseline of bench/gateway.py.

`POST /v1/chat/completions` (streaming and not) in front of the same
`SimulatedEngine` the gateway uses, with the project's own OpenAI wire
models, converters and stream encoder (serve_apps/protocols), so the bytes on
the wire are the gateway's. Nothing else: no auth, no admission, no store, no
metering, no metrics. Like the gateway's streaming route, it pulls the first
chunk before the response starts, so both servers send the role chunk and the
first content delta at the same moment relative to the engine.

It runs uvicorn the way `packserve gateway` does (stdlib asyncio event loop,
httptools, no access log), so the gateway's added latency is its own work,
not a different server set-up; `--uvloop` runs it on uvloop instead.

Run:  .venv/bin/python bench/bare_server.py --port 8100 --ttft-ms 50 --tokens-per-s 100 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pydantic
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from serve_apps.engines.sim import SimulatedEngine
from serve_apps.engines.types import EngineError, GenerationChunk
from serve_apps.gateway.streaming import SseEvents, sse_response
from serve_apps.protocols import openai_convert as convert
from serve_apps.protocols.common import GenerationResult, InvalidRequest
from serve_apps.protocols.openai_models import ChatCompletionRequest, validation_message
from serve_apps.protocols.openai_stream import OpenAIChatStreamEncoder, error_event


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(convert.error_body(status, message, code=code, param=param), status_code=status)


def build_app(engine: SimulatedEngine) -> FastAPI:
    cards = {c.id: c for c in engine.cards() if c.kind == "chat"}
    app = FastAPI(title="packserve bare simulated engine", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": cid, "object": "model", "owned_by": "packserve"}
                                                        for cid in cards]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = ChatCompletionRequest.model_validate(json.loads(await request.body()))
        except json.JSONDecodeError as exc:
            return _error(400, f"Request body is not valid JSON: {exc}", "invalid_json")
        except pydantic.ValidationError as exc:
            message, param = validation_message(exc)
            return _error(400, message, "invalid_request", param)
        card = cards.get(body.model)
        if card is None:
            return JSONResponse(convert.model_not_found_body(body.model), status_code=404)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            gen = convert.chat_to_generation(body, rid, card)
        except InvalidRequest as exc:
            return _error(400, exc.message, "invalid_request", exc.param)
        created = int(time.time())
        chunks = engine.generate(gen)
        if not body.stream:
            result = GenerationResult()
            try:
                async for chunk in chunks:
                    result.add(chunk)
            except EngineError:
                return _error(502, "The model failed while generating.", "engine_error")
            return JSONResponse(convert.chat_response(result, response_id=rid, model=body.model, created=created))

        enc = OpenAIChatStreamEncoder(rid, body.model, created)
        include_usage = body.include_usage
        try:
            first: GenerationChunk | None = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except EngineError:
            return _error(502, "The model failed before producing output.", "engine_error")

        # The gateway's own SSE writer, so the bare server frames and writes a stream exactly as packserve does.
        events = SseEvents(enc.start, enc.chunk, lambda: enc.finish(include_usage=include_usage), error_event)
        return sse_response(first, chunks, events, {})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="simulated time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=100.0, help="simulated decode speed per stream")
    parser.add_argument("--uvloop", action="store_true",
                        help="run on uvloop (uvicorn.run's default) instead of the stdlib asyncio loop")
    args = parser.parse_args()
    engine = SimulatedEngine(ttft_s=args.ttft_ms / 1000, tokens_per_s=args.tokens_per_s)
    config = uvicorn.Config(build_app(engine), host=args.host, port=args.port, access_log=False,
                            log_level="warning", loop="uvloop" if args.uvloop else "asyncio")
    if args.uvloop:
        uvicorn.Server(config).run()
    else:
        # Exactly how `packserve gateway` runs uvicorn (serve_apps/cli/gateway_main.py): Server.serve() inside
        # asyncio.run(), i.e. the stdlib event loop, httptools for HTTP, no access log.
        asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
