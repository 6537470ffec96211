"""The real coding-agent CLIs (Claude Code, opencode, Codex CLI), installed from agents/package-lock.json.

`agent_clis()` installs the lock at most once per test session (and not at
all when agents/node_modules already holds exactly the locked packages),
then returns the path of each CLI's executable after checking that each
reports its locked version.

The install is `npm install --no-save` from the committed lock rather than
`npm ci`: opencode-ai declares optional platform packages that the registry
reachable from here does not serve (only the linux-x64 ones), so npm leaves
them out of the lock and `npm ci` then refuses the lock as out of sync. With
the lock present and package.json pinning exact versions, `npm install`
installs exactly the locked packages, and `--no-save` keeps it from
rewriting the lock. When npm is
missing or the registry cannot be reached, the calling test is skipped with
the reason; any other install failure fails the test, since it means the lock
or the packages are wrong.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

AGENTS_DIR = Path(__file__).resolve().parent.parent / "agents"
NPM_INSTALL_TIMEOUT_S = 900.0
NPM_PING_TIMEOUT_S = 60.0
VERSION_TIMEOUT_S = 60.0
AGENT_TIMEOUT_S = 300.0
# npm's own codes for a registry it could not reach (DNS, refused, reset, timed out, offline).
_NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH",
                   "EHOSTUNREACH", "ERR_SOCKET_TIMEOUT", "network request", "npm ERR! network", "ENOTCACHED")

# Executable (under node_modules/.bin) and the package whose locked version it must report.
CLIS: dict[str, str] = {
    "claude": "@anthropic-ai/claude-code",
    "opencode": "opencode-ai",
    "codex": "@openai/codex",
}


@dataclass(frozen=True)
class AgentClis:
    claude: Path
    opencode: Path
    codex: Path
    versions: dict[str, str]  # package name -> locked version


_installed: AgentClis | None = None
_skip_reason: str | None = None


def locked_versions() -> dict[str, str]:
    lock = json.loads((AGENTS_DIR / "package-lock.json").read_text())
    packages = lock["packages"]
    return {pkg: str(packages[f"node_modules/{pkg}"]["version"]) for pkg in CLIS.values()}


def _up_to_date() -> bool:
    """Whether node_modules was installed from this very lock (npm's hidden lockfile lists the same packages)."""
    hidden = AGENTS_DIR / "node_modules" / ".package-lock.json"
    if not hidden.exists():
        return False
    want = json.loads((AGENTS_DIR / "package-lock.json").read_text())["packages"]
    have = json.loads(hidden.read_text())["packages"]
    for path, entry in have.items():
        if want.get(path, {}).get("integrity") != entry.get("integrity"):
            return False
    installed = set(have)
    return all(f"node_modules/{pkg}" in installed for pkg in CLIS.values())


def _gist(output: str) -> str:
    """npm's error code and request lines (its output ends in advice and a log path)."""
    lines = [line.strip() for line in output.strip().splitlines()]
    useful = [line for line in lines if " code " in line or "request to" in line or "errno" in line]
    return " | ".join(useful[:3] or lines[-4:])


def _registry_unreachable(npm: str) -> str | None:
    """Why the registry cannot be used, or None: `npm install` itself would retry each package for minutes."""
    try:
        done = subprocess.run([npm, "ping", "--fetch-retries=0"], capture_output=True, text=True,
                              timeout=NPM_PING_TIMEOUT_S, check=False, cwd=AGENTS_DIR)
    except subprocess.TimeoutExpired:
        return f"the npm registry did not answer `npm ping` within {NPM_PING_TIMEOUT_S:.0f} s"
    if done.returncode != 0:
        gist = _gist(done.stdout + done.stderr)
        return f"the npm registry is unreachable (`npm ping` exit {done.returncode}): {gist}"
    return None


def _npm_install(npm: str) -> str | None:
    """Install the lock; None on success, else why the tests must skip (a broken lock fails instead)."""
    unreachable = _registry_unreachable(npm)
    if unreachable is not None:
        return unreachable + "; the agent CLIs cannot be installed"
    try:
        done = subprocess.run([npm, "install", "--prefix", str(AGENTS_DIR), "--no-save", "--no-audit", "--no-fund"],
                              capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"`npm install --prefix agents` did not finish within {NPM_INSTALL_TIMEOUT_S:.0f} s"
    if done.returncode == 0:
        return None
    output = done.stdout + done.stderr
    tail = _gist(output)
    if any(code in output for code in _NETWORK_ERRORS):
        return f"the npm registry is unreachable, so the agent CLIs cannot be installed: {tail}"
    pytest.fail(f"`npm install --prefix agents` failed (exit {done.returncode}): {tail}")


def _check_version(binary: Path, package: str, version: str) -> None:
    # A throwaway HOME: some CLIs create their config directory even for --version.
    with tempfile.TemporaryDirectory(prefix="agent-version-") as home:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT_S, check=False, env={"PATH": "/usr/bin:/bin", "HOME": home})
    if done.returncode != 0 or version not in done.stdout:
        pytest.fail(f"{binary} --version gave {done.stdout.strip()!r} (exit {done.returncode}); "
                    f"the lock pins {package} {version}")


def agent_clis() -> AgentClis:
    """The installed CLIs, installing them on first use; skips the test when npm cannot install them."""
    global _installed, _skip_reason
    if _installed is not None:
        return _installed
    if _skip_reason is not None:
        pytest.skip(_skip_reason)
    npm = shutil.which("npm")
    if npm is None:
        _skip_reason = "npm is not installed, so the real agent CLIs (agents/package-lock.json) cannot be installed"
        pytest.skip(_skip_reason)
    (AGENTS_DIR / "node_modules").mkdir(exist_ok=True)
    # Two pytest processes in one checkout install one after the other, not over each other.
    with (AGENTS_DIR / ".install.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not _up_to_date():
            reason = _npm_install(npm)
            if reason is not None:
                _skip_reason = reason
                pytest.skip(reason)
    versions = locked_versions()
    paths = {name: AGENTS_DIR / "node_modules" / ".bin" / name for name in CLIS}
    for name, package in CLIS.items():
        _check_version(paths[name], package, versions[package])
    _installed = AgentClis(claude=paths["claude"], opencode=paths["opencode"], codex=paths["codex"],
                           versions=versions)
    return _installed


# -- running an agent ---------------------------------------------------------------------------

def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """A bare environment: the agent's HOME, config and caches in `home`, nothing non-essential on."""
    for sub in (".config", ".cache", ".local/share", ".local/state"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TERM": "dumb",
            "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_DATA_HOME": str(home / ".local/share"), "XDG_STATE_HOME": str(home / ".local/state"),
            "TMPDIR": str(home), **extra}


def claude_env(home: Path, base_url: str, key: str, model: str, small_model: str) -> dict[str, str]:
    """Claude Code pointed at a packserve gateway (docs/agents.md), with no telemetry or background calls."""
    return isolated_env(
        home,
        ANTHROPIC_BASE_URL=f"{base_url}/anthropic", ANTHROPIC_API_KEY=key,
        ANTHROPIC_MODEL=model, ANTHROPIC_SMALL_FAST_MODEL=small_model,
        ANTHROPIC_DEFAULT_HAIKU_MODEL=small_model,
        DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1", DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_NON_ESSENTIAL_MODEL_CALLS="1",
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
    )


def run_agent(argv: list[str], env: dict[str, str], cwd: Path, stdin: str = "",
              timeout_s: float = AGENT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                              input=stdin, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv[0]} did not finish within {timeout_s:.0f} s; stderr: {exc.stderr!r}")
