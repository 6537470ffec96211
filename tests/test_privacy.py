"""Privacy proven, not promised: a random canary sent in every part of a prompt, through both APIs,
streaming and not, to a real `packserve gateway` process, is found nowhere afterwards: not in the
Redis dump (written uncompressed) nor its append-only file, not in Redis' live keys, not in the
embedded SQLite store, not anywhere in the data directory, not in any log file."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from redis.asyncio import Redis

from serve_apps.engines.sim import FAIL_BEFORE_FIRST_TOKEN, FAIL_MID_STREAM, SIM_EMBED, SIM_LARGE, SIM_SMALL
from tests.conftest import RedisServer, start_redis
from tests.gateway_process import GatewayProcess


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
        elif root.exists():
            yield from (p for p in root.rglob("*") if p.is_file())


def send_everything(base_url: str, key: str, canary: str) -> int:
    """Every kind of request, the canary in every field a prompt has; how many were served."""
    oa = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    an = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0)
    tool: Any = {"type": "function", "function": {"name": "lookup", "description": f"find {canary}",
                                             "parameters": {"type": "object", "properties": {
                                                 "q": {"type": "string", "description": canary}}}}}
    messages: Any = [{"role": "system", "content": f"system {canary}"},
                {"role": "user", "content": f"please repeat {canary} {canary}"}]
    served = 0
    for model in (SIM_LARGE, SIM_SMALL):
        oa.chat.completions.create(model=model, messages=messages, max_tokens=8, user=canary,
                                   tools=[tool], stop=[canary])
        stream = oa.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
        assert any(chunk.usage for chunk in stream)
        oa.completions.create(model=model, prompt=f"complete {canary}", max_tokens=8)
        an.messages.create(model=model, max_tokens=8, system=f"system {canary}",
                           messages=[{"role": "user", "content": f"say {canary}"}],
                           metadata={"user_id": canary})
        with an.messages.stream(model=model, max_tokens=8, messages=[{"role": "user", "content": canary}]) as s:
            assert s.get_final_message().usage.output_tokens > 0
        an.messages.count_tokens(model=model, messages=[{"role": "user", "content": canary}])
        served += 4
    oa.embeddings.create(model=SIM_EMBED, input=[canary, f"and {canary}"])
    served += 1
    # Failures log and settle too: before the first token (refunded) and mid-stream.
    with pytest.raises(openai.APIStatusError):
        oa.chat.completions.create(model=SIM_LARGE, max_tokens=8, messages=[
            {"role": "user", "content": f"{FAIL_BEFORE_FIRST_TOKEN} {canary}"}])
    with pytest.raises(anthropic.APIError), an.messages.stream(model=SIM_LARGE, max_tokens=20, messages=[
            {"role": "user", "content": f"{FAIL_MID_STREAM} {canary}"}]) as s:
        s.get_final_message()
    # Refused ones: a prompt too long for the model, a bad request quoting the canary, a bad key.
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=SIM_SMALL, max_tokens=8, messages=[
            {"role": "user", "content": (canary + " ") * 20_000}])
    with pytest.raises(anthropic.BadRequestError):
        bad_block: Any = {"type": canary, "text": canary}
        an.messages.create(model=SIM_LARGE, max_tokens=8, messages=[{"role": "user", "content": [bad_block]}])
    r = httpx.post(f"{base_url}/v1/chat/completions", headers={"authorization": f"Bearer {canary}"},
                   json={"model": SIM_LARGE, "messages": [{"role": "user", "content": canary}]})
    assert r.status_code == 401
    return served


async def live_redis_values(url: str) -> bytes:
    """Every key and value in the live Redis, whatever its type."""
    client: Any = Redis.from_url(url)
    out: list[bytes] = []
    readers = {"string": lambda k: client.get(k), "hash": lambda k: client.hgetall(k),
               "list": lambda k: client.lrange(k, 0, -1), "set": lambda k: client.smembers(k),
               "zset": lambda k: client.zrange(k, 0, -1), "stream": lambda k: client.xrange(k)}
    try:
        async for key in client.scan_iter(count=1000):
            kind = (await client.type(key)).decode()
            # repr keeps every byte of an ASCII canary visible, whatever the value's structure.
            out.append(repr((key, await readers[kind](key))).encode())
        await client.config_set("rdbcompression", "no")  # so the dump is searchable byte for byte
        await client.save()
    finally:
        await client.aclose()
    return b"\n".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["redis", "embedded"])
def test_the_canary_is_nowhere(tmp_path: Path, store: str) -> None:
    canary = "CANARY" + secrets.token_hex(12)
    redis: RedisServer | None = start_redis(tmp_path / "redis", persistent=True) if store == "redis" else None
    gw = GatewayProcess(tmp_path / "gateway", redis_url=redis.url if redis else None,
                        config={"gateway": {"access_log": True}})
    try:
        with gw:
            account_id, key = gw.new_key(["founder"])
            served = send_everything(gw.base_url, key, canary)
            usage = httpx.get(f"{gw.base_url}/admin/v1/accounts/{account_id}/usage/export",
                              headers=gw.admin_headers).text
        live = asyncio.run(live_redis_values(redis.url)) if redis else b""
    finally:
        if redis is not None:
            redis.stop()
    # The stores did record these requests (so there was something to search): metadata only.
    assert usage.count("\n") >= served
    assert canary not in usage
    assert canary.encode() not in live
    searched = list(files_under(tmp_path))
    names = {p.name for p in searched}
    assert "gateway.log" in names
    if store == "redis":
        assert "dump.rdb" in names and any(".aof" in n for n in names), names
        assert live, "the live Redis held the accounts and usage"
    else:
        assert "packserve.db" in names
    log_text = (tmp_path / "gateway" / "gateway.log").read_text()
    assert "request finished" in log_text, "the gateway logged its requests (and was searched)"
    found = [str(p) for p in searched if canary.encode() in p.read_bytes()]
    assert found == []
