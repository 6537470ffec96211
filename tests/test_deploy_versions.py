"""Deployment versions: what a model replica is built from, and when a redeploy must restart it.

tests/test_job_submit.py checks the effect on a real cluster (replicas kept or replaced).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_apps.config import AppConfig, load_config
from serve_apps.deploy import serving_plan
from serve_apps.deploy import versions as deploy_versions
from serve_apps.deploy.versions import code_fingerprint, deployment_version, inherited_environment

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "serve_apps" / "configs" / "local.yaml"
SMOLLM = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"


def changed(config: AppConfig, model_id: str, **update: object) -> AppConfig:
    models = tuple(m.model_copy(update=update) if m.id == model_id else m for m in config.models)
    return config.model_copy(update={"models": models})


def test_replica_config_holds_the_model_its_adapters_and_engine_fields_only() -> None:
    config = load_config(LOCAL)
    replica = serving_plan.replica_config(config, SMOLLM)
    parsed = AppConfig.model_validate(replica)  # what ModelServer does with it
    assert [m.id for m in parsed.models] == [SMOLLM, "hf:packserve/SmolLM2-135M-fix-json"]
    assert parsed.engine == "vllm" and parsed.models[0].vllm == config.models[0].vllm
    assert all(set(m) <= serving_plan.ENGINE_FIELDS for m in replica["models"])


@pytest.mark.parametrize(("update", "restarts"), [
    ({"output_price": "9.99"}, False),
    ({"weight": "3"}, False),
    ({"owned_by": "someone"}, False),
    ({"cold_start_timeout_s": 30.0}, False),
    ({"affinity_max_queue": 2}, False),
    ({"context_length": 1024}, True),
    ({"features": ("streaming",)}, True),
])
def test_only_engine_fields_change_a_models_replica_config(update: dict[str, object], restarts: bool) -> None:
    config = load_config(LOCAL)
    before = serving_plan.replica_config(config, SMOLLM)
    after = serving_plan.replica_config(changed(config, SMOLLM, **update), SMOLLM)
    assert (before != after) is restarts


def test_an_adapter_change_reaches_its_base_models_replicas() -> None:
    config = load_config(LOCAL)
    before = serving_plan.replica_config(config, SMOLLM)
    after = serving_plan.replica_config(changed(config, "hf:packserve/SmolLM2-135M-fix-json", adapter_path="/a"),
                                        SMOLLM)
    assert before != after


def test_versions_are_equal_for_equal_inputs_and_opaque() -> None:
    token = "admin-secret-token"
    first = deployment_version("gateway", {"a": 1}, token)
    assert first == deployment_version("gateway", {"a": 1}, token)
    assert first != deployment_version("gateway", {"a": 2}, token)
    assert first != deployment_version("gateway", {"a": 1}, "another-token")
    assert token not in first and len(first) == 20


def test_environment_replicas_inherit_is_part_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKSERVE_REDIS_URL", "redis://one:6379/0")
    one = inherited_environment({"env_vars": {"HF_TOKEN": "x"}, "working_dir": "gcs://_ray_pkg_1.zip"})
    monkeypatch.setenv("PACKSERVE_REDIS_URL", "redis://two:6379/0")
    two = inherited_environment({"env_vars": {"HF_TOKEN": "x"}, "working_dir": "gcs://_ray_pkg_1.zip"})
    assert one != two
    # The working dir's package hash covers every file (README included): the code fingerprint stands for it.
    same = inherited_environment({"env_vars": {"HF_TOKEN": "x"}, "working_dir": "gcs://_ray_pkg_2.zip"})
    assert same == two
    assert inherited_environment({"env_vars": {"HF_TOKEN": "y"}}) != two


def test_code_fingerprint_covers_the_packages_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for package in deploy_versions.PACKAGES:
        (tmp_path / package / "__pycache__").mkdir(parents=True)
        (tmp_path / package / "mod.py").write_text("x = 1\n")
    monkeypatch.setattr(deploy_versions, "ROOT", tmp_path)
    code_fingerprint.cache_clear()
    try:
        base = code_fingerprint()
        code_fingerprint.cache_clear()
        (tmp_path / "serve_apps" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
        assert code_fingerprint() == base
        code_fingerprint.cache_clear()
        (tmp_path / "cluster" / "mod.py").write_text("x = 2\n")
        assert code_fingerprint() != base
    finally:
        code_fingerprint.cache_clear()


def test_the_fingerprinted_packages_are_the_ones_a_job_ships() -> None:
    # ROOT is the checkout's root (what `ray job submit --working-dir .` uploads), not a package inside it.
    for package in deploy_versions.PACKAGES:
        assert (deploy_versions.ROOT / package / "__init__.py").is_file(), package
