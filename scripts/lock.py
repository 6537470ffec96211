"""Regenerate requirements.lock from pyproject.toml's ranges: `make lock`.

What the lock holds is exactly what a tested `.venv` holds. The script builds
a throw-away virtual environment the way the ranges resolve today (pip, with
this machine's pip configuration, so torch's CPU build comes from wherever pip
is told to take it), installs the packages that carry the embedded models
without their dependencies, removes the packages that must not be there, and
freezes the result. `uv pip compile --no-deps` then adds every file hash the
index knows for each pinned release; a pin whose files the index does not
list (torch's local `+cpu` build) is hashed from the file pip downloads.

The lock is for CPython 3.11 on Linux x86_64, the project's machines. The
header records a fingerprint of pyproject.toml's dependency lists, so
tests/test_lock.py fails when one is changed without the other.

Usage: python scripts/lock.py [--output requirements.lock] [--pip-arg=ARG ...]
(`--pip-arg=--extra-index-url=https://download.pytorch.org/whl/cpu` where torch's
CPU build is not on local disk).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.lockfile import LOCK_PYTHON, fingerprint, lock_settings  # noqa: E402

PLATFORM = "x86_64-manylinux_2_28"


def run(cmd: list[str], *, capture: bool = False) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, capture_output=capture).stdout or ""


def build_venv(venv: Path, pip_args: list[str]) -> list[str]:
    """Install the project's ranges into `venv` as `make test` once did; return its `pip freeze`."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    settings = lock_settings(pyproject)
    extras = ",".join(settings.extras)
    run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    run([*pip, "install", "--quiet", "--upgrade", "pip", *pip_args])
    # torch first, by its exact CPU release: a later resolve then keeps it instead of a CUDA build.
    run([*pip, "install", "--quiet", *pip_args, *settings.first])
    run([*pip, "install", "--quiet", *pip_args, f"{ROOT}[{extras}]"])
    run([*pip, "install", "--quiet", "--no-deps", *pip_args, *settings.no_deps])
    if settings.exclude:
        run([*pip, "uninstall", "--quiet", "-y", *settings.exclude])
    frozen = run([*pip, "freeze", "--all", "--exclude", "packserve"], capture=True)
    return [line for line in frozen.splitlines() if line and not line.startswith("#")]


def hash_missing(lock_text: str, venv: Path, pip_args: list[str]) -> str:
    """Add the sha256 of pip's own download to every pin the index gave no hash for."""
    out: list[str] = []
    lines = lock_text.splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        for i, line in enumerate(lines):
            out.append(line)
            pin = re.fullmatch(r"(\S+==\S+)", line)
            if pin is None:
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if nxt.strip().startswith("--hash="):
                continue
            dest = Path(tmp) / pin.group(1)
            run([str(venv / "bin" / "python"), "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest),
                 *pip_args, pin.group(1)])
            files = sorted(dest.iterdir())
            digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
            out[-1] = line + " \\"
            out.extend(f"    --hash=sha256:{d}" + (" \\" if n < len(digests) - 1 else "")
                       for n, d in enumerate(digests))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "requirements.lock")
    parser.add_argument("--pip-arg", action="append", default=[], help="passed to every pip call")
    parser.add_argument("--uv", default=shutil.which("uv") or str(Path(sys.executable).parent / "uv"))
    args = parser.parse_args()
    if sys.version_info[:2] != LOCK_PYTHON:
        sys.exit(f"the lock is for Python {'.'.join(map(str, LOCK_PYTHON))}; run this with that interpreter")
    pyproject_text = (ROOT / "pyproject.toml").read_text()
    with tempfile.TemporaryDirectory(prefix="packserve-lock-") as tmp:
        venv = Path(tmp) / "venv"
        print("==> resolving pyproject.toml's ranges into a fresh environment (a few minutes)", flush=True)
        pins = build_venv(venv, args.pip_arg)
        pins_file = Path(tmp) / "pins.txt"
        pins_file.write_text("\n".join(pins) + "\n")
        print(f"==> {len(pins)} packages; collecting their hashes", flush=True)
        find_links = [a.split("=", 1)[1] for a in args.pip_arg if a.startswith("--find-links=")]
        compiled = run([args.uv, "pip", "compile", str(pins_file), "--no-deps", "--generate-hashes", "--no-header",
                        "--no-annotate", "--python-version", "{}.{}".format(*LOCK_PYTHON),
                        "--python-platform", PLATFORM, "--quiet",
                        *[f"--find-links={f}" for f in dict.fromkeys([*find_links, *local_find_links()])]],
                       capture=True)
        body = hash_missing(compiled, venv, args.pip_arg)
    header = (
        "# packserve's lock: every package of the project's .venv, at exact versions, with hashes.\n"
        "# Regenerate with `make lock` (scripts/lock.py); never edit by hand.\n"
        f"# Python {'.'.join(map(str, LOCK_PYTHON))}, Linux x86_64.\n"
        f"# pyproject-fingerprint: {fingerprint(tomllib.loads(pyproject_text))}\n"
    )
    args.output.write_text(header + body)
    print(f"==> wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


def local_find_links() -> list[str]:
    """pip's configured find-links (where torch's CPU build lies on this project's machines)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [m.group(1) for m in re.finditer(r"find-links='([^']+)'", out)]


if __name__ == "__main__":
    main()
