"""Two `packserve gateway` processes on one Redis show the same console figures.

A refusal on one gateway is in the other's `/v2/refusals` and per-model
counts; each lists both gateways in its stats; a SIGKILLed gateway drops out
of the list once its heartbeat TTL passes (a short TTL from the config file;
the test polls, it never sleeps past a poll interval).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_process import GatewayProcess

MODEL = "hf:packserve/sim-large"
HEARTBEAT_S = 0.2
TTL_S = 1.0
CONFIG = {"console": {"flush_interval_s": 0.05, "heartbeat_interval_s": HEARTBEAT_S, "heartbeat_ttl_s": TTL_S}}


def poll(check: Callable[[], Any], timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s: {check.__doc__ or check}")
        time.sleep(0.05)


def stats(gw: GatewayProcess) -> dict[str, Any]:
    r = httpx.get(f"{gw.base_url}/admin/v1/stats", headers=gw.admin_headers, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def chat(gw: GatewayProcess, key: str) -> None:
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_two_gateways_share_refusals_percentiles_and_the_gateway_list(redis_url: str, tmp_path: Path) -> None:
    with GatewayProcess(tmp_path / "a", redis_url=redis_url, config=CONFIG) as a, \
            GatewayProcess(tmp_path / "b", redis_url=redis_url, config=CONFIG) as b:
        both = poll(lambda: (s := stats(b))["gateways"]["count"] == 2 and s)
        listed = {g["address"]: g for g in both["gateways"]["data"]}
        assert set(listed) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
        assert all(g["version"] and g["started_ms"] > 0 and g["in_flight"] == 0 for g in listed.values())
        assert both["gateway_id"] == listed[f"127.0.0.1:{b.port}"]["gateway_id"]

        account_id, _ = a.new_key()
        capped = httpx.post(f"{a.base_url}/admin/v1/accounts/{account_id}/keys", headers=a.admin_headers,
                            json={"max_requests": 1}, timeout=10).json()
        chat(a, capped["key"])
        with pytest.raises(openai.RateLimitError):
            chat(a, capped["key"])

        def seen_on_b() -> list[dict[str, Any]]:
            """gateway a's refusal in gateway b's /v2/refusals"""
            r = httpx.get(f"{b.base_url}/v2/refusals", headers={"authorization": f"Bearer {capped['key']}"},
                          timeout=10)
            return list(r.json()["data"])

        rows = poll(seen_on_b)
        assert [(r["reason"], r["status"], r["model"], r["key_id"]) for r in rows] == [
            ("key_request_cap_reached", 429, MODEL, capped["id"])]
        large = stats(b)["recent"]["models"][MODEL]
        assert large["refusals"] == {"key_request_cap_reached": 1}
        assert large["served"] == 1 and large["ttft_p50_ms"] is not None, "gateway a's request, in b's percentiles"

        a.kill()  # SIGKILL: nothing removes its heartbeat, it expires
        assert stats(b)["gateways"]["count"] == 2, "still listed until its TTL passes"
        poll(lambda: stats(b)["gateways"]["count"] == 1, timeout_s=TTL_S + 5)
        assert stats(b)["gateways"]["data"][0]["address"] == f"127.0.0.1:{b.port}"
