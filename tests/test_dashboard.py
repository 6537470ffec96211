"""The dashboard page is served, its script is valid JavaScript, and the endpoints it reads answer."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.live_gateway import ADMIN_TOKEN, LiveGateway


def test_dashboard_page_and_its_data_sources(tmp_path: Path) -> None:
    with LiveGateway(redis_url=None, data_dir=tmp_path) as gw:
        page = httpx.get(f"{gw.base_url}/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        for fetched in ("/v2/quotas", "/v2/usage?days=14", "/admin/v1/stats", "/admin/v1/accounts"):
            assert fetched in page.text
        script = re.search(r"<script>(.*)</script>", page.text, re.S)
        assert script is not None
        node = shutil.which("node")
        if node is None:
            pytest.skip("node is not installed: cannot syntax-check the dashboard script")
        js = tmp_path / "dashboard.js"
        js.write_text(script.group(1))
        checked = subprocess.run([node, "--check", str(js)], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr

        _, key = gw.new_key(["standard"])
        auth = {"authorization": f"Bearer {key}"}
        chat = {"model": "hf:packserve/sim-large", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(f"{gw.base_url}/v1/chat/completions", json=chat, headers=auth).status_code == 200
        usage = httpx.get(f"{gw.base_url}/v2/usage?days=14", headers=auth).json()
        assert usage["rows"][0]["model"] == "hf:packserve/sim-large" and usage["rows"][0]["requests"] == 1
        stats = httpx.get(f"{gw.base_url}/admin/v1/stats", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert stats.status_code == 200 and stats.json()["in_flight"] == 0
        assert httpx.get(f"{gw.base_url}/admin/v1/stats").status_code == 401
