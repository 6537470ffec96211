"""What requirements.lock must agree with in pyproject.toml, shared by scripts/lock.py and its test.

pyproject.toml keeps ranges (for people who install packserve into an
environment of their own); `[tool.packserve.lock]` says how the project's own
`.venv` is made from them: which extras, what is installed first, which
packages come without their dependencies, and which must not be there.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LOCK_PYTHON = (3, 11)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


@dataclass(frozen=True)
class LockSettings:
    extras: tuple[str, ...]
    first: tuple[str, ...]
    no_deps: tuple[str, ...]
    exclude: tuple[str, ...]


def lock_settings(pyproject: Mapping[str, Any]) -> LockSettings:
    table = pyproject["tool"]["packserve"]["lock"]
    return LockSettings(tuple(table["extras"]), tuple(table["first"]), tuple(table["no-deps"]),
                        tuple(table["exclude"]))


def direct_requirements(pyproject: Mapping[str, Any]) -> list[str]:
    """Every requirement the locked `.venv` must satisfy, as written in pyproject.toml."""
    project = pyproject["project"]
    settings = lock_settings(pyproject)
    reqs = list(project["dependencies"])
    for extra in settings.extras:
        reqs.extend(project["optional-dependencies"][extra])
    return [*reqs, *settings.first, *settings.no_deps]


def fingerprint(pyproject: Mapping[str, Any]) -> str:
    """A digest of everything in pyproject.toml that decides the lock's contents."""
    project = pyproject["project"]
    settings = lock_settings(pyproject)
    material = {
        "dependencies": project["dependencies"],
        "extras": {e: project["optional-dependencies"][e] for e in settings.extras},
        "lock": pyproject["tool"]["packserve"]["lock"],
        "requires-python": project.get("requires-python"),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> tuple[str | None, dict[str, str], dict[str, int]]:
    """(recorded fingerprint, {canonical name: version}, {canonical name: number of hashes})."""
    recorded: str | None = None
    pins: dict[str, str] = {}
    hashes: dict[str, int] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# pyproject-fingerprint:"):
            recorded = line.split(":", 1)[1].strip()
            continue
        match = _PIN.match(line)
        if match:
            current = canonical(match.group(1))
            pins[current] = match.group(2)
            hashes[current] = 0
        elif current is not None and line.strip().startswith("--hash="):
            hashes[current] += 1
    return recorded, pins, hashes


def entry(text: str, name: str) -> str:
    """One package's lines of the lock (its pin and hashes), as a requirements file of its own."""
    lines = text.splitlines()
    out: list[str] = []
    for line in lines:
        match = _PIN.match(line)
        if match:
            if out:
                break
            if canonical(match.group(1)) == canonical(name):
                out.append(line)
        elif out and line.startswith((" ", "\t")):
            out.append(line)
    if not out:
        raise SystemExit(f"{name} is not in the lock")
    return "\n".join(out).rstrip(" \\") + "\n"


if __name__ == "__main__":
    # `python scripts/lockfile.py LOCK NAME`: the Makefile installs the installer (uv) from the lock first.
    import sys
    from pathlib import Path

    sys.stdout.write(entry(Path(sys.argv[1]).read_text(), sys.argv[2]))
