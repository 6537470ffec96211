"""`packserve serve` as an operator runs it: a real subprocess, a real local Ray, the simulated engine.

It must come up with a demo key that the official SDKs can use, and a
SIGTERM (systemd, `docker stop`, Kubernetes) must stop it the way Ctrl-C
does: exit 0 and leave no process of the Ray it started behind.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
import yaml

from serve_apps.cli.serve_main import CONFIG_DIR, _reason_line
from serve_apps.host.ports import free_port
from tests.processes import kill_session, session_members

pytestmark = pytest.mark.ray

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0
# Ray's agents notice a dead raylet within seconds; this only bounds the wait.
LEFTOVER_TIMEOUT_S = 30.0


def read_banner(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """stdout up to the banner's last line, or fail with what it printed."""
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout

    def pump() -> None:
        # A selector on the pipe misses lines the text wrapper has already buffered.
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    out: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        out.append(line)
        if line.startswith("Ctrl-C stops it"):
            return "".join(out)
    pytest.fail(f"no banner from `packserve serve` (exit {proc.poll()}); stdout: {''.join(out)!r}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    config = yaml.safe_load((CONFIG_DIR / "local-sim.yaml").read_text())
    config["gateway"]["port"] = free_port()
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PACKSERVE_DATA_DIR": str(tmp_path / "data")}
    for name in ("RAY_ADDRESS", "PACKSERVE_REDIS_URL"):
        env.pop(name, None)
    stderr = tmp_path / "serve.err"
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "serve_apps", "serve", "--config", str(path)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
    try:
        yield proc, read_banner(proc, START_TIMEOUT_S), stderr
    finally:
        # Whatever a failed test left running: `serve` and the whole Ray it started.
        kill_session(proc.pid)
        proc.wait(timeout=30)


def test_serve_answers_the_sdks_and_stops_cleanly_on_sigterm(
        served: tuple[subprocess.Popen[str], str, Path]) -> None:
    proc, banner, stderr = served
    openai_url = re.search(r"OpenAI base URL:\s+(\S+)", banner)
    anthropic_url = re.search(r"Anthropic base URL:\s+(\S+)", banner)
    key = re.search(r"demo API key:\s+(\S+)", banner)
    assert openai_url and anthropic_url and key, banner

    chat = openai.OpenAI(base_url=openai_url[1], api_key=key[1]).chat.completions.create(
        model="hf:packserve/sim-small", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert chat.choices[0].message.content
    message = anthropic.Anthropic(base_url=anthropic_url[1], api_key=key[1]).messages.create(
        model="hf:packserve/sim-small", max_tokens=8, messages=[{"role": "user", "content": "hello"}])
    assert message.content and message.usage.output_tokens > 0

    names = set(session_members(proc.pid).values())
    assert {"gcs_server", "raylet"} <= names, f"expected Ray's processes in the session of `serve`: {names}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, stderr.read_text()[-2000:]
    assert "packserve: stopping" in stderr.read_text()

    deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = session_members(proc.pid)
    assert not left, f"processes left running after SIGTERM: {left}"


def test_serve_names_why_a_deployment_failed_and_leaves_nothing(tmp_path: Path) -> None:
    """A wrong Redis URL: one line naming the deployment and the reason, exit 1, Ray stopped."""
    config = yaml.safe_load((CONFIG_DIR / "local-sim.yaml").read_text())
    config["gateway"]["port"] = free_port()
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    closed = free_port()  # nothing listens there
    env = {**os.environ, "PACKSERVE_DATA_DIR": str(tmp_path / "data"),
           "PACKSERVE_REDIS_URL": f"redis://127.0.0.1:{closed}/0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "serve_apps", "serve", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=START_TIMEOUT_S)
        assert proc.returncode == 1, stderr[-2000:]
        errors = [line for line in stderr.splitlines() if line.startswith("packserve: error:")]
        # Ray's own message alone said only "Failed to update the deployments ['gateway']".
        assert len(errors) == 1 and errors[0].startswith(
            "packserve: error: deployment failed: gateway: cluster.store.StoreError: cannot reach Redis at "
            f"127.0.0.1:{closed}"), stderr[-2000:]
        deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not session_members(proc.pid)
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)


def test_the_reason_line_of_an_error_text() -> None:
    """HAProxy's crash text (as seen in CI) names its cause in an ALERT line; a traceback in its last line."""
    haproxy = ("RuntimeError: HAProxy crashed during startup: [NOTICE]   (5606) : haproxy version is 2.8.25\n"
               "[ALERT]    (5606) : Binding [/tmp/haproxy-serve/x/haproxy.cfg:95] for proxy stats: cannot bind "
               "socket (Address already in use) for [0.0.0.0:41433]\n"
               "[ALERT]    (5606) : [haproxy.main()] Some protocols failed to start their listeners! Exiting.\n")
    assert "cannot bind socket (Address already in use) for [0.0.0.0:41433]" in _reason_line(haproxy)
    assert _reason_line("Traceback (most recent call last):\n  File x\nValueError: bad\n\n") == "ValueError: bad"
    assert _reason_line("") == ""
