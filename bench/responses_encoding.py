"""CPU cost of the Responses API's wire work next to chat completions', per request, in one process.

Rerun (from the repository root):

    .venv/bin/python bench/responses_encoding.py [--requests 20000] [--rounds 5] [--json]

bench/gateway.py measures what the Responses API adds to time to first token
end to end, which on a shared machine moves by more than the difference it is
looking for. This measures the difference itself: for the same one-message
conversation, the CPU time (of this process, so other load on the machine
counts little) a gateway spends in each API's own code before the
first text delta leaves (parse the body into the wire model, convert it to the
engine-neutral request, encode the opening events and the first text delta),
and for the whole stream (32 one-token deltas and the closing events). Each
API runs `--requests` times per round, rounds alternating between them; the
table gives the median round, in microseconds per request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit_json, machine, print_table
from serve_apps.engines.sim import SIM_LARGE, SimulatedEngine
from serve_apps.engines.types import GenerationChunk, TokenUsage
from serve_apps.protocols.openai_convert import chat_to_generation
from serve_apps.protocols.openai_models import ChatCompletionRequest
from serve_apps.protocols.openai_stream import OpenAIChatStreamEncoder
from serve_apps.protocols.responses_convert import response_echo, responses_to_generation
from serve_apps.protocols.responses_models import ResponsesRequest
from serve_apps.protocols.responses_stream import ResponsesStreamEncoder

CARD = {c.id: c for c in SimulatedEngine().cards()}[SIM_LARGE]
QUESTION = "Benchmark request 6: explain what the stream returns."
DELTAS = 32
CHAT_BODY = {"model": SIM_LARGE, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": DELTAS,
             "stream": True, "stream_options": {"include_usage": True}}
RESPONSES_BODY = {"model": SIM_LARGE, "input": [{"role": "user", "content": QUESTION}],
                  "max_output_tokens": DELTAS, "stream": True}
CHUNKS = [GenerationChunk(text=" word", usage=TokenUsage(16, 0, i + 1)) for i in range(DELTAS)]
FINAL = GenerationChunk(finish_reason="length", usage=TokenUsage(16, 0, DELTAS))


def chat(whole: bool) -> None:
    req = ChatCompletionRequest.model_validate(CHAT_BODY)
    chat_to_generation(req, "chatcmpl-bench", CARD)
    enc = OpenAIChatStreamEncoder("chatcmpl-bench", req.model, 1)
    enc.start()
    enc.chunk(CHUNKS[0])
    if whole:
        for c in CHUNKS[1:]:
            enc.chunk(c)
        enc.chunk(FINAL)
        enc.finish(include_usage=True)


def responses(whole: bool) -> None:
    req = ResponsesRequest.model_validate(RESPONSES_BODY)
    responses_to_generation(req, "resp_bench", CARD)
    enc = ResponsesStreamEncoder(response_echo(req), "resp_bench", 1)
    enc.start()
    enc.chunk(CHUNKS[0])
    if whole:
        for c in CHUNKS[1:]:
            enc.chunk(c)
        enc.chunk(FINAL)
        enc.finish(completed_at=2)


def per_request_us(work: Callable[[bool], None], whole: bool, n: int) -> float:
    # This process's CPU time, not the wall clock: other processes on a shared machine then do not count.
    started = time.process_time()
    for _ in range(n):
        work(whole)
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per API per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for whole, label in ((False, "to first delta"), (True, f"whole stream ({DELTAS} deltas)")):
        rounds: dict[str, list[float]] = {"chat": [], "responses": []}
        for r in range(args.rounds):
            order = [("chat", chat), ("responses", responses)]
            for name, work in order if r % 2 == 0 else order[::-1]:
                rounds[name].append(per_request_us(work, whole, args.requests))
        c, s = statistics.median(rounds["chat"]), statistics.median(rounds["responses"])
        rows.append({"span": label, "chat_us": round(c, 1), "responses_us": round(s, 1),
                     "responses_minus_chat_us": round(s - c, 1)})
    print(f"machine: {machine()}   date: {datetime.now(UTC):%Y-%m-%d}   {args.requests} requests x "
          f"{args.rounds} rounds per API")
    print_table("CPU per request in each API's own code (parse, convert, encode), median round",
                rows, ["span", "chat_us", "responses_us", "responses_minus_chat_us"])
    if args.json:
        emit_json({"machine": machine(), "date": f"{datetime.now(UTC):%Y-%m-%d}", "requests": args.requests,
                   "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
