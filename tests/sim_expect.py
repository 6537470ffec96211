"""Expectations about the simulated engine and waits shared by the SDK gateway tests."""

from __future__ import annotations

import time
import uuid
from typing import Any

from serve_apps.engines.sim import render_chat_prompt, tokenize
from serve_apps.engines.types import ChatMessage
from tests.live_gateway import LiveGateway

LARGE = "hf:packserve/sim-large"
SMALL = "hf:packserve/sim-small"
EMBED = "hf:packserve/sim-embed"
PRICES_MICRO = {LARGE: (1_200_000, 3_400_000), SMALL: (300_000, 2_000_000), EMBED: (0, 0)}
BLOCK = 16  # the simulated prefix cache's block size (SimulatedEngine default)


def unique(label: str) -> str:
    """A word no other request has used, so the prefix cache cannot hit by accident."""
    return f"{label}{uuid.uuid4().hex[:12]}"


def long_text(words: int, seed: str) -> str:
    vocab = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    return seed + " " + " ".join(vocab[(i * 7) % len(vocab)] for i in range(words))


def prompt_tokens(messages: list[ChatMessage]) -> list[str]:
    return tokenize(render_chat_prompt(messages, ()))


def expected_cached(previous: list[str], current: list[str]) -> int:
    """What the simulated prefix cache reports: whole shared blocks, never the last prompt token."""
    shared = 0
    for a, b in zip(previous, current, strict=False):
        if a != b:
            break
        shared += 1
    return min(shared // BLOCK, (len(current) - 1) // BLOCK) * BLOCK


def cost_pico(model: str, prompt: int, cached: int, completion: int) -> int:
    """SPEC §1 token cost for a subscription (cache reads at 20%), in picodollars."""
    p_in, p_out = PRICES_MICRO[model]
    return (prompt - cached) * p_in + cached * p_in // 5 + completion * p_out


def wait_events(gw: LiveGateway, account_id: str, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Settlement runs in its own task just after the response: poll until `count` events landed."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = gw.usage_events(account_id)
        if len(events) >= count or time.monotonic() > deadline:
            assert len(events) == count, events
            return sorted(events, key=lambda e: e["ts_ms"])
        time.sleep(0.02)
