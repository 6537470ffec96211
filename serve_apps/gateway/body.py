"""Reading request bodies: size limit, content type, JSON, then the protocol's pydantic model."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import pydantic
from starlette.requests import ClientDisconnect, Request

from serve_apps.gateway.errors import ApiError, client_closed

M = TypeVar("M", bound=pydantic.BaseModel)

# No request of either API nests anywhere near this deep (a tool's JSON schema
# is the deepest part of a real body); deeper bodies are hostile, and every
# later step (validation, conversion, re-encoding for the engine) recurses.
MAX_JSON_DEPTH = 64


def json_depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), walked without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in node if isinstance(child, dict | list))
    return deepest


async def read_json(request: Request, max_bytes: int) -> Any:
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.split(";")[0].lower():
        raise ApiError(415, f"Content-Type must be application/json, got {content_type!r}.", "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"Request body is {declared} bytes; the limit is {max_bytes}.", "request_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"Request body exceeds the limit of {max_bytes} bytes.", "request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise client_closed() from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "Request body is empty; expected a JSON object.", "invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:
        # The decoder's own recursion guard: far deeper than MAX_JSON_DEPTH.
        raise ApiError(400, f"Request body nests JSON deeper than {MAX_JSON_DEPTH} levels.", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object.", "invalid_json")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, f"Request body nests JSON deeper than {MAX_JSON_DEPTH} levels.", "invalid_json")
    return body


async def parse(request: Request, model: type[M], max_bytes: int,
                describe: Callable[[pydantic.ValidationError], tuple[str, str | None]]) -> M:
    body = await read_json(request, max_bytes)
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        message, param = describe(exc)
        raise ApiError(400, message, "invalid_request", param) from None
