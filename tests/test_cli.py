"""The `packserve` CLI against the embedded store and Redis, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, data_dir: Path, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PACKSERVE_DATA_DIR": str(data_dir)}
    env.pop("PACKSERVE_REDIS_URL", None)
    if redis_url:
        env["PACKSERVE_REDIS_URL"] = redis_url
    return subprocess.run([sys.executable, "-m", "serve_apps", *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "embedded" else str(request.getfixturevalue("redis_url"))


@pytest.mark.slow
def test_account_lifecycle(tmp_path: Path, backend: str | None) -> None:
    made = cli("--json", "accounts", "create", "acme", "--packs", "standard", "founder", data_dir=tmp_path,
               redis_url=backend)
    assert made.returncode == 0, made.stderr
    account = json.loads(made.stdout)
    assert account["limits"]["requests_per_5h"] == 1250
    key = json.loads(cli("--json", "keys", "create", account["id"], data_dir=tmp_path, redis_url=backend).stdout)
    assert key["key"].startswith("ps-")
    listed = cli("keys", "list", account["id"], data_dir=tmp_path, redis_url=backend)
    assert key["id"] in listed.stdout and key["key"] not in listed.stdout
    quota = cli("quota", account["id"], data_dir=tmp_path, redis_url=backend)
    assert quota.returncode == 0
    assert "1250/1250" in quota.stdout and "$60.00/$60.00" in quota.stdout
    changed = cli("--json", "accounts", "set-packs", account["id"], "standard", data_dir=tmp_path,
                  redis_url=backend)
    assert json.loads(changed.stdout)["packs"] == ["standard"]
    assert cli("accounts", "suspend", account["id"], data_dir=tmp_path, redis_url=backend).returncode == 0
    assert "SUSPENDED" in cli("accounts", "show", account["id"], data_dir=tmp_path, redis_url=backend).stdout
    usage = cli("usage", account["id"], data_dir=tmp_path, redis_url=backend)
    assert usage.returncode == 0 and "total" in usage.stdout
    assert cli("keys", "revoke", key["id"], data_dir=tmp_path, redis_url=backend).returncode == 0
    refused = cli("accounts", "delete", account["id"], data_dir=tmp_path, redis_url=backend)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert cli("accounts", "delete", account["id"], "--yes", data_dir=tmp_path, redis_url=backend).returncode == 0
    assert account["id"] not in cli("accounts", "list", data_dir=tmp_path, redis_url=backend).stdout


@pytest.mark.parametrize(("args", "message"), [
    (("accounts", "create", "x", "--packs", "gold"), "unknown pack kind 'gold'"),
    (("accounts", "create", "x"), "at least 1 pack"),
    (("accounts", "create", "x", "--packs", *["standard"] * 6), "at most 5 packs"),
    (("accounts", "create", "x", "--payg", "--spend-cap", "-3"), "positive dollar amount"),
    (("accounts", "show", "acct_missing"), "no account 'acct_missing'"),
    (("keys", "revoke", "key_missing"), "no active key 'key_missing'"),
    (("usage", "acct_missing"), "no account"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_nonzero(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = cli(*args, data_dir=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert cli("--json", "accounts", "list", data_dir=tmp_path).stdout.strip() == "[]"  # nothing half-written


@pytest.mark.slow
def test_malformed_and_unreachable_redis(tmp_path: Path) -> None:
    bad = cli("accounts", "list", data_dir=tmp_path, redis_url="http://nope")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "redis" in bad.stderr.lower()
    down = cli("accounts", "list", data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    assert down.returncode != 0 and "cannot reach Redis" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_embedded_store_survives_restart(tmp_path: Path) -> None:
    made = json.loads(cli("--json", "accounts", "create", "a", "--packs", "standard", data_dir=tmp_path).stdout)
    key = json.loads(cli("--json", "keys", "create", made["id"], data_dir=tmp_path).stdout)
    # A fresh process sees the account and key written by the previous one.
    shown = json.loads(cli("--json", "accounts", "show", made["id"], data_dir=tmp_path).stdout)
    assert [k["id"] for k in shown["keys"]] == [key["id"]]
    assert (tmp_path / "packserve.db").exists()


@pytest.mark.slow
def test_server_mode_uses_the_admin_api(tmp_path: Path) -> None:
    from tests.live_gateway import ADMIN_TOKEN, LiveGateway

    with LiveGateway(redis_url=None, data_dir=tmp_path / "server") as gw:
        env_extra = {"PACKSERVE_ADMIN_TOKEN": ADMIN_TOKEN}

        def remote(*args: str) -> subprocess.CompletedProcess[str]:
            env = {**os.environ, **env_extra}
            return subprocess.run([sys.executable, "-m", "serve_apps", "--server", gw.base_url, *args],
                                  capture_output=True, text=True, env=env, timeout=60, check=False)

        made = remote("--json", "accounts", "create", "remote", "--packs", "founder")
        assert made.returncode == 0, made.stderr
        account = json.loads(made.stdout)
        key = json.loads(remote("--json", "keys", "create", account["id"]).stdout)
        assert gw.quotas(key["key"])["rollingFiveHourLimit"]["max"] == 750
        assert "750/750" in remote("quota", account["id"]).stdout
        missing = remote("accounts", "show", "acct_nope")
        assert missing.returncode != 0 and "no account" in missing.stderr
        env_extra = {"PACKSERVE_ADMIN_TOKEN": "wrong"}
        denied = remote("accounts", "list")
        assert denied.returncode != 0 and "401" in denied.stderr


def test_the_shipped_configs_are_where_packserve_serve_looks() -> None:
    from serve_apps.cli.serve_main import CONFIG_DIR, DEFAULT_CONFIG

    assert (CONFIG_DIR / "local.yaml").is_file() and (CONFIG_DIR / "local-sim.yaml").is_file()
    assert Path(DEFAULT_CONFIG).is_file()
