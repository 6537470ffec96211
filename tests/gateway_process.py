"""A real `packserve gateway --engine sim` process for tests that kill, restart or inspect it.

Its stdout and stderr go to a log file the test can read (and search), its
data directory is the test's own, and `kill()` is SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import free_port

ADMIN = "admin-for-process-tests"


class GatewayProcess:
    def __init__(self, directory: Path, *, redis_url: str | None = None, config: dict[str, Any] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.data_dir = directory / "data"
        self.log_path = directory / "gateway.log"
        self.config_path = directory / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump({"engine": "sim", **(config or {})}))
        self.redis_url = redis_url
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_headers = {"authorization": f"Bearer {ADMIN}"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> GatewayProcess:
        env = {**os.environ, "PACKSERVE_ADMIN_TOKEN": ADMIN, "PACKSERVE_DATA_DIR": str(self.data_dir)}
        env.pop("PACKSERVE_REDIS_URL", None)
        args = [sys.executable, "-m", "serve_apps"]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        args += ["gateway", "--engine", "sim", "--config", str(self.config_path), "--port", str(self.port),
                 *self.extra_args]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start; see {self.log_path}:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def new_key(self, packs: list[str] | None = None) -> tuple[str, str]:
        account = httpx.post(f"{self.base_url}/admin/v1/accounts", headers=self.admin_headers,
                             json={"name": "t", "packs": packs or ["standard"]}, timeout=30)
        assert account.status_code == 201, account.text
        key = httpx.post(f"{self.base_url}/admin/v1/accounts/{account.json()['id']}/keys",
                         headers=self.admin_headers, timeout=30)
        assert key.status_code == 201, key.text
        return str(account.json()["id"]), str(key.json()["key"])

    def usage_events(self, account_id: str) -> list[dict[str, Any]]:
        """The account's usage events as the admin export gives them, oldest first."""
        r = httpx.get(f"{self.base_url}/admin/v1/accounts/{account_id}/usage/export", headers=self.admin_headers,
                      timeout=30)
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]

    def stop(self) -> None:
        """SIGTERM: a graceful stop (settlements drained, logs flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
