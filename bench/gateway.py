"""Gateway overhead: time to first token and stream throughput, bare vs packserve vs LiteLLM.

Rerun (from the repository root; the first run also builds LiteLLM's own venv):

    .venv/bin/python bench/gateway.py [--json]
    .venv/bin/python bench/gateway.py --concurrency 1,16,64 --requests-per-stream 15 --min-requests 40 \\
        --max-requests 640 --rounds 4 --ttft-ms 50 --tokens-per-s 100 --max-tokens 32 \\
        [--skip-litellm] [--with-ray] [--profile-gateway FILE] [--json]
    .venv/bin/python bench/gateway.py --skip-litellm --with-ray --concurrency 1,4,16 --json   # the Ray path

Four targets (five with --with-ray), all up at once and measured in the same run, at each
concurrency level (1, 16 and 64 concurrent streams by default), with the same
simulated model settings (time to first token, tokens per second, output
length). Each level is split into --rounds parts and the targets take turns
(rotating order), pooling each target's samples, so background load on a
shared machine hits all of them alike:

(a) bare     bench/bare_server.py: the simulated engine (`SimulatedEngine`)
             served over HTTP with the project's own OpenAI converters and
             stream encoder; no auth, no admission, no store. The baseline.
             It runs uvicorn exactly as `packserve gateway` does (stdlib
             asyncio loop, httptools), so (b) - (a) is the gateway's own work.
(b) packserve  `python -m serve_apps gateway --engine sim` on a real
             redis-server started here: API key auth, admission against the
             Redis store (reserve before, settle after), lease renewal,
             metrics, the per-request log line. Its simulated engine runs
             IN-PROCESS: there is no upstream HTTP hop. So packserve's
             "added latency" = gateway cost only (auth + admission round trips
             to Redis + its own bookkeeping), on top of the same HTTP serving
             and encoding the bare server does.
(b') packserve-responses  the same gateway process as (b), the same
             conversation and output budget sent to POST /v1/responses
             (`input`, `max_output_tokens`); TTFT is the first
             `response.output_text.delta`. Its accounts are its own. Its
             added TTFT minus (b)'s is what the Responses encoding costs.
(c) litellm  a LiteLLM proxy (`litellm[proxy]` from PyPI, in its own venv
             bench/.venv-litellm, no database, one master key, callbacks,
             spend/error logs and request logging off) in front of the bare
             server (a). Its "added latency" = one extra loopback HTTP hop +
             LiteLLM's own request handling and chunk re-encoding.
(d) packserve-ray  (`--with-ray`) `python -m serve_apps serve` with
             serve_apps/configs/local-sim.yaml (this run's Redis, port and
             simulated speed, the model alone on one replica): the whole
             packserve path of a real deployment on Ray Serve, HAProxy → the
             gateway replica (direct ingress; the same gateway work as (b))
             → a DeploymentHandle call → the model replica running the same
             simulated engine. Its "added latency" is everything packserve
             puts between a client and an engine, with no engine compute:
             what bench/serving.py's vLLM comparison adds on top is CPU
             contention with the engine, and that machine's noise.

"Added" p50/p99 TTFT is the target's percentile minus the bare server's
percentile at the same concurrency (a difference of percentiles, not a
percentile of per-request differences). TTFT is measured by the client from
just before the request is sent to the arrival of the first SSE event whose
delta has non-empty `content` (for (b'), the first `response.output_text.delta`).
Per-stream tokens/s is the decode rate a client
sees, (completion_tokens - 1) / (last content delta - first content delta),
as a time-weighted mean over requests, i.e. sum of tokens / sum of decode
times (ideal = --tokens-per-s); requests/s is completed
requests / the target's own wall time at that level.

Each stream (worker) sends its requests one after another (a closed loop);
the workers of a level start spread over one request's duration, as
independent clients would (every simulated request takes the same time, so
workers started together would stay in lockstep and arrive in bursts of N;
--no-stagger measures that worst case). Against packserve
every worker has its own account (5 standard packs, so its own concurrency
slots) and key, so no request ever waits for a concurrency slot: the numbers
are overhead, not queueing. Every request uses the same prompt, chosen so the
simulated model always produces exactly --max-tokens tokens.

Caveat: the load generator (this process: asyncio + httpx) shares the
machine's cores with the servers it measures (and with redis-server, and for
(c) with the bare server too), so at high concurrency some of the latency is
CPU contention on the client side as well as in the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import emit_json, free_port, log, machine, percentile, print_table, process, redis_server

ROOT = Path(__file__).resolve().parent.parent
MODEL = "hf:packserve/sim-large"
LOCAL_SIM_CONFIG = ROOT / "serve_apps" / "configs" / "local-sim.yaml"
SERVE_READY = "Ctrl-C stops it"  # what `packserve serve` prints once everything answers
LITELLM_MODEL = "sim-large"
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
PROJECT_PYTHON = sys.executable
CPU_NOTE = ("note: the load generator (one Python process, asyncio + httpx) shares the machine's "
            f"{os.cpu_count()} CPU cores with the servers it measures (and redis-server / the bare upstream).")


# ----------------------------------------------------------------- processes


def wait_http(url: str, proc: subprocess.Popen[bytes], name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{name} did not answer {url} within {timeout_s:.0f} s")


def ensure_litellm_venv() -> Path:
    """bench/.venv-litellm with `litellm[proxy]`: LiteLLM pins its own openai/httpx, so never in our .venv."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    log(f"creating {LITELLM_VENV} (first use; LiteLLM lives in its own venv) ...")
    subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    # Like Python 3.13's venv: keep the venv out of git and out of ruff.
    (LITELLM_VENV / ".gitignore").write_text("*\n")
    log("installing litellm[proxy] from PyPI into it (a few minutes) ...")
    subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--upgrade", "pip"], check=True,
                   stdout=sys.stderr)
    subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "litellm[proxy]"], check=True,
                   stdout=sys.stderr)
    if not exe.exists():
        raise SystemExit(f"pip finished but {exe} is missing")
    return exe


def litellm_config(bare_url: str, master_key: str) -> str:
    """One model, no database, one master key; every logging/callback path that it lets us turn off, off."""
    return f"""\
model_list:
  - model_name: {LITELLM_MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {bare_url}/v1
      api_key: none
litellm_settings:
  set_verbose: false
  json_logs: false
  callbacks: []
  success_callback: []
  failure_callback: []
  turn_off_message_logging: true
  request_timeout: 600
general_settings:
  master_key: {master_key}
  disable_spend_logs: true
  disable_error_logs: true
"""


LITELLM_ENV = {
    "LITELLM_LOG": "ERROR",  # also turns uvicorn's access log off (its level drops below INFO)
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from the internet at start-up
    "LITELLM_TELEMETRY": "False",
    "LITELLM_MODE": "PRODUCTION",  # no .env loading
    "STORE_MODEL_IN_DB": "False",
}


# ----------------------------------------------------------------- load generator


@dataclass
class Sample:
    ok: bool
    ttft_s: float = 0.0
    tokens: int = 0
    decode_s: float = 0.0
    text: str = ""
    error: str = ""


@dataclass
class Target:
    name: str
    url: str  # the chat completions URL (the Responses URL when api == "responses")
    model: str
    keys: list[str]  # worker i uses keys[i % len(keys)]
    extra: dict[str, Any] = field(default_factory=dict)
    api: str = "chat"  # "chat" or "responses"


def request_body(target: Target, payload: dict[str, Any]) -> dict[str, Any]:
    """The chat payload as `target` takes it: the same conversation and output budget over the Responses API."""
    if target.api == "responses":
        return {"model": target.model, "input": payload["messages"], "max_output_tokens": payload["max_tokens"],
                "stream": payload["stream"]}
    return {**payload, "model": target.model}


def stream_content(event: dict[str, Any]) -> tuple[str | None, int | None, str | None]:
    """(content delta, completion tokens, error) of one SSE event of either API."""
    kind = event.get("type")
    if kind == "response.output_text.delta":
        return event.get("delta"), None, None
    if kind in ("response.completed", "response.incomplete"):
        return None, int(event["response"]["usage"]["output_tokens"]), None
    if kind in ("response.failed", "error"):
        return None, None, json.dumps(event)[:300]
    if "error" in event:
        return None, None, str(event["error"])
    usage = event.get("usage")
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") is not None else None
    content = next(((c.get("delta") or {}).get("content") for c in event.get("choices") or ()), None)
    return content, tokens, None


async def one_stream(client: httpx.AsyncClient, target: Target, key: str, payload: dict[str, Any],
                     keep_text: bool = False) -> Sample:
    body = request_body(target, payload)
    headers = {"authorization": f"Bearer {key}"}
    started = time.perf_counter()
    t_first = t_last = 0.0
    content_events = 0
    usage_tokens: int | None = None
    text: list[str] = []
    try:
        async with client.stream("POST", target.url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread())[:300].decode(errors="replace")
                return Sample(ok=False, error=f"HTTP {resp.status_code}: {detail}")
            buf = b""
            async for raw in resp.aiter_raw():
                now = time.perf_counter()
                buf += raw
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    content, tokens, error = stream_content(json.loads(data))
                    if error is not None:
                        return Sample(ok=False, error=f"stream error: {error}")
                    if tokens is not None:
                        usage_tokens = tokens
                    if content:
                        content_events += 1
                        if not t_first:
                            t_first = now
                        t_last = now
                        if keep_text:
                            text.append(content)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Sample(ok=False, error=f"{type(exc).__name__}: {exc}")
    if not t_first:
        return Sample(ok=False, error="stream ended without any content delta")
    tokens = usage_tokens if usage_tokens is not None else content_events
    return Sample(ok=True, ttft_s=t_first - started, tokens=tokens, decode_s=t_last - t_first, text="".join(text))


async def run_level(client: httpx.AsyncClient, target: Target, payload: dict[str, Any], streams: int,
                    requests: int, stagger_s: float = 0.0) -> tuple[list[Sample], float]:
    """`streams` closed-loop workers share `requests`; returns the samples and the busy wall time.

    Every simulated request takes the same time, so workers started together
    would stay in lockstep and hit the server in bursts of `streams` at once.
    Worker i starts i/streams of `stagger_s` (one request's duration) late, so
    arrivals are spread as from independent clients; the stagger's average
    idle time is taken off the wall time used for requests/s.
    """
    samples: list[Sample] = []
    remaining = requests

    async def worker(i: int) -> None:
        nonlocal remaining
        key = target.keys[i % len(target.keys)]
        await asyncio.sleep(stagger_s * i / streams)
        while remaining > 0:
            remaining -= 1
            samples.append(await one_stream(client, target, key, payload))

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(streams)))
    idle = stagger_s * (streams - 1) / (2 * streams)
    return samples, time.perf_counter() - started - idle


def summarize(target: str, streams: int, samples: list[Sample], wall_s: float) -> dict[str, Any]:
    good = [s for s in samples if s.ok]
    ttft = [s.ttft_s * 1000 for s in good]
    decoded = [s for s in good if s.tokens > 1]
    decode_s = sum(s.decode_s for s in decoded)
    errors = [s.error for s in samples if not s.ok]
    row: dict[str, Any] = {
        "target": target,
        "streams": streams,
        "requests": len(samples),
        "errors": len(errors),
        "ttft_p50_ms": round(percentile(ttft, 50), 2),
        "ttft_p99_ms": round(percentile(ttft, 99), 2),
        # Time-weighted mean over streams (sum of tokens / sum of decode time): a CPU-starved client that
        # reads a burst of queued deltas at once then cannot report absurd per-request rates.
        "tok_s_per_stream": round(sum(s.tokens - 1 for s in decoded) / decode_s, 1) if decode_s > 0 else float("nan"),
        "req_s": round(len(good) / wall_s, 1),
    }
    if errors:
        row["first_error"] = errors[0]
    return row


def requests_at(streams: int, args: argparse.Namespace) -> int:
    return int(min(args.max_requests, max(args.min_requests, streams * args.requests_per_stream)))


async def measure(targets: list[Target], payload: dict[str, Any], levels: Sequence[int],
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """Check, warm up, then measure every target at every level, interleaved.

    The machine is shared (other processes may come and go), so instead of
    measuring one target after another, each level is split into --rounds
    parts and the targets take turns (in a rotating order), and each target's
    samples are pooled: a burst of background load then hits all of them alike.
    """
    top = max(levels)
    limits = httpx.Limits(max_connections=top + 8, max_keepalive_connections=top + 8)
    clients = {t.name: httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) for t in targets}
    try:
        reference: str | None = None
        for t in targets:
            check = await one_stream(clients[t.name], t, t.keys[0], payload, keep_text=True)
            if not check.ok:
                raise SystemExit(f"{t.name}: the check request failed: {check.error}")
            if reference is None:
                reference = check.text
                log(f"  {t.name}: check request ok ({check.tokens} tokens)")
            elif check.text != reference:
                raise SystemExit(f"{t.name}: the check request returned different text than {targets[0].name}:\n"
                                 f"  {targets[0].name}: {reference!r}\n  {t.name}: {check.text!r}")
            else:
                log(f"  {t.name}: check request ok ({check.tokens} tokens, same text as {targets[0].name})")
        warm = max(2 * top, 20)
        for t in targets:
            log(f"  {t.name}: warm-up, {warm} requests at {top} streams ...")
            warm_samples, _ = await run_level(clients[t.name], t, payload, top, warm, args.stagger_s)
            bad = [x for x in warm_samples if not x.ok]
            if bad:
                raise SystemExit(f"{t.name}: {len(bad)} warm-up requests failed, first: {bad[0].error}")
        rows = []
        for streams in levels:
            n = requests_at(streams, args)
            rounds = max(1, min(args.rounds, n // streams))
            parts = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
            log(f"  {streams} streams: {n} requests per target, in {rounds} interleaved rounds ...")
            pooled: dict[str, list[Sample]] = {t.name: [] for t in targets}
            wall: dict[str, float] = {t.name: 0.0 for t in targets}
            for r, part in enumerate(parts):
                for t in targets[r % len(targets):] + targets[:r % len(targets)]:
                    got, secs = await run_level(clients[t.name], t, payload, streams, part, args.stagger_s)
                    pooled[t.name] += got
                    wall[t.name] += secs
                    # Let the target finish any background work (LiteLLM's post-request handlers) before
                    # the next one is measured.
                    await asyncio.sleep(args.pause_s)
            for t in targets:
                row = summarize(t.name, streams, pooled[t.name], wall[t.name])
                rows.append(row)
                log(f"    {t.name}: ttft p50 {row['ttft_p50_ms']} ms, p99 {row['ttft_p99_ms']} ms, "
                    f"{row['req_s']} req/s, errors {row['errors']}")
        return rows
    finally:
        for c in clients.values():
            await c.aclose()


async def pick_prompt(url: str, max_tokens: int) -> str:
    """A prompt whose natural simulated answer is at least max_tokens long, so every request has the same length."""
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(200):
            prompt = f"Benchmark request {i}: explain what the stream returns."
            r = await client.post(url, json={"model": MODEL, "max_tokens": 4096,
                                              "messages": [{"role": "user", "content": prompt}]})
            r.raise_for_status()
            if r.json()["usage"]["completion_tokens"] >= max_tokens:
                return prompt
    raise SystemExit(f"no prompt found with a natural answer of {max_tokens}+ tokens; lower --max-tokens")


async def create_accounts(base: str, admin_token: str, n: int) -> list[str]:
    headers = {"authorization": f"Bearer {admin_token}"}
    keys: list[str] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        for i in range(n):
            r = await client.post("/admin/v1/accounts",
                                  json={"name": f"bench-{i}", "plan": "subscription", "packs": ["standard"] * 5})
            r.raise_for_status()
            k = await client.post(f"/admin/v1/accounts/{r.json()['id']}/keys")
            k.raise_for_status()
            keys.append(k.json()["key"])
    return keys


# ----------------------------------------------------------------- profile


@contextmanager
def py_spy(pid: int, out: Path | None) -> Iterator[None]:
    if out is None:
        yield
        return
    exe = Path(PROJECT_PYTHON).parent / "py-spy"
    log(f"  profiling the gateway (pid {pid}) with py-spy -> {out}")
    spy = subprocess.Popen([str(exe), "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                            "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if spy.returncode not in (0, -signal.SIGINT) and not out.exists():
            log(f"  py-spy failed: {err.decode(errors='replace')[-500:]}")


def _frame(raw: str) -> str:
    """`func (/long/path/pkg/mod.py:123)` -> `func (pkg/mod.py)`: aggregate per function, not per line."""
    m = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", raw)
    if m is None:
        return raw
    return f"{m.group(1)} ({'/'.join(m.group(2).split('/')[-2:])})"


def profile_summary(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive share of busy samples per function, from py-spy's raw (collapsed stacks) output.

    Samples waiting in the event loop's `select` (idle) are counted apart and left out of the shares.
    """
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        if frames[-1].startswith(("EpollSelector.select ", "select ")):
            idle += n
            continue
        total += n
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + n
    if not total:
        return {"self": [], "inclusive": [], "idle_pct": 100.0}

    def best(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"self": best(self_n), "inclusive": best(incl_n), "idle_pct": round(100 * idle / (idle + total), 1)}


# ----------------------------------------------------------------- main


def main_run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(x) for x in args.concurrency.split(",")]
    litellm_exe = None if args.skip_litellm else ensure_litellm_venv()
    settings = {"ttft_ms": args.ttft_ms, "tokens_per_s": args.tokens_per_s, "max_tokens": args.max_tokens,
                "concurrency": levels, "requests": {str(c): requests_at(c, args) for c in levels},
                "rounds": args.rounds, "stagger_s": round(args.stagger_s, 3),
                "pause_s": args.pause_s}
    results: dict[str, Any] = {"machine": machine(), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                               "settings": settings, "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    sim = ["--ttft-ms", str(args.ttft_ms), "--tokens-per-s", str(args.tokens_per_s)]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        bare_port = free_port()
        bare_url = f"http://127.0.0.1:{bare_port}"
        log(f"starting the bare simulated server on {bare_url} ...")
        bare = stack.enter_context(process("bare", [PROJECT_PYTHON, str(ROOT / "bench" / "bare_server.py"),
                                                    "--port", str(bare_port), *sim]))
        wait_http(f"{bare_url}/health", bare, "bare server", 60)
        targets = [Target("bare", f"{bare_url}/v1/chat/completions", MODEL, ["none"])]

        redis_url = stack.enter_context(redis_server())
        port = free_port()
        admin_token = secrets.token_hex(16)
        base = f"http://127.0.0.1:{port}"
        log(f"starting the packserve gateway on {base} (redis {redis_url}) ...")
        gw = stack.enter_context(process(
            "gateway", [PROJECT_PYTHON, "-m", "serve_apps", "gateway", "--engine", "sim", "--port", str(port),
                        "--redis-url", redis_url, "--data-dir", str(tmp / "data"), "--sim-ttft-ms", str(args.ttft_ms),
                        "--sim-tokens-per-s", str(args.tokens_per_s)],
            env={"PACKSERVE_ADMIN_TOKEN": admin_token}))
        wait_http(f"{base}/health", gw, "packserve gateway", 60)
        keys = asyncio.run(create_accounts(base, admin_token, max(levels)))
        targets.append(Target("packserve", f"{base}/v1/chat/completions", MODEL, keys))
        # The same gateway over the Responses API, with accounts of its own.
        keys = asyncio.run(create_accounts(base, admin_token, max(levels)))
        targets.append(Target("packserve-responses", f"{base}/v1/responses", MODEL, keys, api="responses"))

        if args.with_ray:
            port = free_port()
            cfg = tmp / "ray-sim.yaml"
            cfg.write_text(json.dumps(ray_sim_config(redis_url, tmp / "ray-data", port, args.ttft_ms,
                                                           args.tokens_per_s)))
            base = f"http://127.0.0.1:{port}"
            log(f"starting `packserve serve` (Ray Serve, simulated engine) on {base} (~30 s) ...")
            stack.enter_context(process(
                "packserve-ray", [PROJECT_PYTHON, "-m", "serve_apps", "serve", "--config", str(cfg)],
                env={"PACKSERVE_ADMIN_TOKEN": admin_token, "PACKSERVE_DATA_DIR": str(tmp / "ray-data")},
                ready=SERVE_READY, ready_timeout_s=300))
            keys = asyncio.run(create_accounts(base, admin_token, max(levels)))
            targets.append(Target("packserve-ray", f"{base}/v1/chat/completions", MODEL, keys))

        if litellm_exe is not None:
            master_key = "sk-bench-" + secrets.token_hex(12)
            port = free_port()
            cfg = tmp / "litellm.yaml"
            cfg.write_text(litellm_config(bare_url, master_key))
            log(f"starting the LiteLLM proxy on port {port} (slow imports: up to a minute or two) ...")
            proxy = stack.enter_context(process(
                "litellm", [str(litellm_exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                            "--num_workers", "1"], env=LITELLM_ENV, unset=("DATABASE_URL",)))
            wait_http(f"http://127.0.0.1:{port}/health/liveliness", proxy, "LiteLLM", 300)
            targets.append(Target("litellm", f"http://127.0.0.1:{port}/v1/chat/completions", LITELLM_MODEL,
                                  [master_key]))

        prompt = asyncio.run(pick_prompt(f"{bare_url}/v1/chat/completions", args.max_tokens))
        results["prompt"] = prompt
        payload = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                   "stream": True, "stream_options": {"include_usage": True}}
        with py_spy(gw.pid, args.profile_gateway):
            rows = asyncio.run(measure(targets, payload, levels, args))
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]

    bare_by_level = {r["streams"]: r for r in rows if r["target"] == "bare"}
    for r in rows:
        b = bare_by_level[r["streams"]]
        r["added_p50_ms"] = round(r["ttft_p50_ms"] - b["ttft_p50_ms"], 2)
        r["added_p99_ms"] = round(r["ttft_p99_ms"] - b["ttft_p99_ms"], 2)
    results["rows"] = rows
    results["targets"] = verdict(rows)
    if args.profile_gateway is not None and args.profile_gateway.exists():
        results["gateway_profile"] = profile_summary(args.profile_gateway)
    return results


def ray_sim_config(redis_url: str, data_dir: Path, port: int, ttft_ms: float, tokens_per_s: float) -> dict[str, Any]:
    """local-sim.yaml with this run's Redis, port and simulated speed, MODEL alone on exactly one replica.

    One replica, so no autoscaling decision lands inside a measured level;
    the gateway keeps local-sim.yaml's settings (one replica too).
    """
    from serve_apps.config import AppConfig, load_config

    raw: dict[str, Any] = load_config(LOCAL_SIM_CONFIG).model_dump(mode="json")
    raw["store"] = {"redis_url": redis_url, "data_dir": str(data_dir)}
    raw["gateway"]["port"] = port
    raw["demo_account"] = False
    raw["sim"] = {"ttft_ms": ttft_ms, "tokens_per_s": tokens_per_s}
    raw["models"] = [{**m, "autoscaling": {**m["autoscaling"], "min_replicas": 1, "max_replicas": 1}}
                     for m in raw["models"] if m["id"] == MODEL]
    return AppConfig.model_validate(raw).model_dump(mode="json")


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issues' targets: packserve adds < 3 ms p50 TTFT at 16 streams, and < 1/3 of what LiteLLM adds;
    over the Responses API it adds within 0.5 ms of what it adds over chat completions (1 and 16 streams)."""
    at16 = {r["target"]: r for r in rows if r["streams"] == 16}
    out: dict[str, Any] = {}
    if "packserve" in at16:
        ps = at16["packserve"]["added_p50_ms"]
        out["packserve_added_p50_ms_at_16"] = ps
        out["under_3ms"] = ps < 3.0
        if "litellm" in at16:
            lt = at16["litellm"]["added_p50_ms"]
            out["litellm_added_p50_ms_at_16"] = lt
            out["under_a_third_of_litellm"] = lt > 0 and ps < lt / 3
    chat = {r["streams"]: r for r in rows if r["target"] == "packserve"}
    responses = {r["streams"]: r for r in rows if r["target"] == "packserve-responses"}
    gaps = {streams: round(r["added_p50_ms"] - chat[streams]["added_p50_ms"], 2)
            for streams, r in sorted(responses.items()) if streams in chat and streams in (1, 16)}
    if gaps:
        out["responses_minus_chat_added_p50_ms"] = {str(k): v for k, v in gaps.items()}
        out["responses_within_half_ms_of_chat"] = all(abs(v) <= 0.5 for v in gaps.values())
    ray = {r["streams"]: r["added_p50_ms"] for r in rows if r["target"] == "packserve-ray"}
    if ray:
        out["ray_added_p50_ms"] = {str(k): v for k, v in sorted(ray.items())}
        out["ray_under_10ms"] = all(v < 10.0 for v in ray.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated concurrent stream counts")
    parser.add_argument("--requests-per-stream", type=int, default=15,
                        help="requests per level = streams x this, within [--min-requests, --max-requests]")
    parser.add_argument("--min-requests", type=int, default=40)
    parser.add_argument("--max-requests", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=4,
                        help="split each level into this many parts, the targets taking turns")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="simulated time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=100.0, help="simulated decode speed per stream")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--skip-litellm", action="store_true", help="measure only bare and packserve")
    parser.add_argument("--with-ray", action="store_true",
                        help="also measure packserve on Ray Serve (`packserve serve`, HAProxy, gateway and model "
                             "replicas) with the same simulated engine")
    parser.add_argument("--profile-gateway", type=Path, default=None,
                        help="record a py-spy profile (raw collapsed stacks) of the gateway while it is measured")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    parser.add_argument("--pause-s", type=float, default=0.5, help="idle time between two targets' turns")
    parser.add_argument("--no-stagger", action="store_true",
                        help="start all streams of a level at once (lockstep bursts) instead of spread out")
    args = parser.parse_args()
    args.stagger_s = 0.0 if args.no_stagger else (args.ttft_ms + 1000 * args.max_tokens / args.tokens_per_s) / 1000
    if args.ttft_ms <= 0 or args.tokens_per_s <= 0:
        parser.error("--ttft-ms and --tokens-per-s must be > 0 (0 means 'config default' to the gateway)")

    results = main_run(args)
    s = results["settings"]
    print(f"machine: {results['machine']}   date: {results['date']}   load average (1/5/15 min) before: "
          f"{results['loadavg_before']}, after: {results['loadavg_after']}")
    print(f"simulated model: TTFT {s['ttft_ms']:g} ms, {s['tokens_per_s']:g} tokens/s per stream, "
          f"{s['max_tokens']} output tokens per request")
    cols = ["target", "streams", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms", "added_p50_ms", "added_p99_ms",
            "tok_s_per_stream", "req_s"]
    print_table("Time to first token and stream throughput (added = target percentile - bare percentile)",
                results["rows"], cols)
    print("\npackserve: simulated engine in-process (no upstream hop): added = auth + admission (Redis) + "
          "bookkeeping.\nlitellm: in front of the bare server: added = one loopback HTTP hop + LiteLLM.")
    if args.with_ray:
        print("packserve-ray: `packserve serve` on Ray Serve: added = HAProxy + the gateway replica + a handle call "
              "+ the model replica (no engine compute).")
    print(CPU_NOTE)
    t = results["targets"]
    if "packserve_added_p50_ms_at_16" in t:
        line = (f"\ntarget: packserve adds < 3 ms p50 TTFT at 16 streams: {t['packserve_added_p50_ms_at_16']} ms "
                f"-> {'met' if t['under_3ms'] else 'NOT met'}")
        if "litellm_added_p50_ms_at_16" in t:
            line += (f"\ntarget: < 1/3 of LiteLLM's added p50 ({t['litellm_added_p50_ms_at_16']} ms) "
                     f"-> {'met' if t['under_a_third_of_litellm'] else 'NOT met'}")
        print(line)
    if "responses_minus_chat_added_p50_ms" in t:
        gaps = ", ".join(f"{v:+} ms at {k}" for k, v in t["responses_minus_chat_added_p50_ms"].items())
        print(f"target: the Responses API adds p50 TTFT within 0.5 ms of chat completions' (1 and 16 streams): "
              f"{gaps} -> {'met' if t['responses_within_half_ms_of_chat'] else 'NOT met'}")
    if "ray_added_p50_ms" in t:
        added = ", ".join(f"{v} ms at {k}" for k, v in t["ray_added_p50_ms"].items())
        print(f"target: packserve on Ray Serve adds < 10 ms p50 TTFT (engine compute excluded): {added} "
              f"-> {'met' if t['ray_under_10ms'] else 'NOT met'}")
    if "gateway_profile" in results:
        print(f"\ngateway profile (py-spy, share of busy samples; {results['gateway_profile']['idle_pct']}% "
              "of all samples idle in select): self time")
        for name, pct in results["gateway_profile"]["self"]:
            print(f"  {pct:5.1f}%  {name}")
        print("inclusive")
        for name, pct in results["gateway_profile"]["inclusive"]:
            print(f"  {pct:5.1f}%  {name}")
    if args.json:
        emit_json(results)


if __name__ == "__main__":
    main()
