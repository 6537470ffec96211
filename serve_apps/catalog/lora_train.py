"""Train the project's fix-json LoRA adapter on the embedded SmolLM2-135M-Instruct, on CPU, in a few minutes.

The adapter repairs broken JSON (the shipped data of `serve_apps.catalog.fix_json_data`).
Its prompt format is fixed, and is what clients send through the gateway:

    one user message:   "Fix this JSON. Reply with the corrected JSON only.\\n" + <broken text>
    assistant answer:   <the repaired JSON, as json.dumps writes it>, then <|im_end|>

rendered with the model's own chat template (which adds SmolLM2's default
system prompt), exactly as the vLLM engine renders a chat request; the loss
covers the answer tokens only (and the end-of-turn token, so the adapter
learns to stop).

Training is plain PyTorch with `peft` (no Trainer): deterministic seed,
length-bucketed batches, logits computed only where the loss is, a progress
callback. The output directory is an ordinary PEFT adapter
(`adapter_config.json` + `adapter_model.safetensors`) that vLLM loads as a
`LoRARequest`, plus `training.json` with the measured loss and time.

`serve_apps.catalog.build` runs this once as a build step after converting
SmolLM2 and caches the result in `<data_dir>/models/fix-json-lora/`;
`python -m serve_apps.catalog.lora_train --base-dir MODEL --out DIR` trains
into a directory of your choice (this module never imports the build, so the
two do not import each other).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve_apps.catalog import fix_json_data

FIX_JSON_ID = "hf:packserve/SmolLM2-135M-fix-json"
ADAPTER_DIR_NAME = "fix-json-lora"
INSTRUCTION = "Fix this JSON. Reply with the corrected JSON only."
REPORT_FILE = "training.json"
# What the training imports, as (import name, pip requirement).
TRAINING_DEPS: tuple[tuple[str, str], ...] = (("torch", "torch==2.13.0"), ("transformers", "transformers"),
                                              ("peft", "peft"))

# (steps done, total steps, latest loss) -> None
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainSettings:
    """The training recipe; its fingerprint (with the data's) names a build, so changing either retrains."""

    rank: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 1e-3
    warmup_steps: int = 8
    steps: int = 96
    batch_size: int = 4
    seed: int = 1234
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Per-example cap on prompt + answer tokens; the shipped data stays far below it.
    max_tokens: int = 384


@dataclass
class TrainReport:
    steps: int
    examples: int
    seconds: float
    # Mean loss (per answer token) over the first and last 10 steps.
    loss_start: float
    loss_end: float
    settings: dict[str, Any] = field(default_factory=dict)


def user_message(broken: str) -> str:
    """The one user message the adapter was trained on (and must be sent)."""
    return f"{INSTRUCTION}\n{broken}"


def fingerprint(settings: TrainSettings | None = None) -> str:
    """A short hash of the recipe and the training data: the build marker's key for the adapter."""
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(settings or TrainSettings()), sort_keys=True).encode())
    digest.update(fix_json_data.TRAIN_FILE.read_bytes())
    return digest.hexdigest()[:16]


def _encode(tokenizer: Any, broken: str, fixed: str, max_tokens: int) -> tuple[list[int], int] | None:
    """(token ids, index of the first answer token); the prompt is tokenized exactly as the vLLM engine does."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(broken)}], add_generation_prompt=True, tokenize=False
    )
    prompt = list(tokenizer.encode(str(text), add_special_tokens=False))
    answer = [*tokenizer.encode(fixed, add_special_tokens=False), tokenizer.eos_token_id]
    if len(prompt) + len(answer) > max_tokens:
        return None
    return prompt + answer, len(prompt)


def _batches(examples: Sequence[tuple[list[int], int]], settings: TrainSettings) -> list[list[int]]:
    """`settings.steps` batches of example indices: epochs of length-bucketed batches, shuffled by the seed."""
    rng = random.Random(settings.seed)
    out: list[list[int]] = []
    while len(out) < settings.steps:
        order = list(range(len(examples)))
        rng.shuffle(order)
        # Sort within windows of 8 batches: little padding, still a random mix.
        window = settings.batch_size * 8
        epoch: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
            epoch += [chunk[i : i + settings.batch_size] for i in range(0, len(chunk), settings.batch_size)]
        rng.shuffle(epoch)
        out += epoch
    return out[: settings.steps]


# CPU flags of a native bfloat16 matrix multiply (Intel AMX, AVX-512 BF16); without them torch emulates it.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def native_bf16(flags: frozenset[str]) -> bool:
    return not NATIVE_BF16_FLAGS.isdisjoint(flags)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This CPU's feature flags (Linux); none where /proc/cpuinfo is absent, which trains in float32."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_dtype() -> Any:
    """The torch dtype to run the chat model in on this CPU: bfloat16 where it computes it natively (about
    twice float32's speed), else float32 (emulated bfloat16 runs several times slower than float32)."""
    import torch

    return torch.bfloat16 if native_bf16(cpu_flags()) else torch.float32


def train_adapter(
    base_dir: Path,
    out_dir: Path,
    settings: TrainSettings | None = None,
    on_step: StepCallback | None = None,
    train_file: Path | None = None,
) -> TrainReport:
    """Fine-tune a LoRA adapter of the chat model in `base_dir` on the fix-json data; writes it to `out_dir`."""
    settings = settings or TrainSettings()
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    # The frozen base in the CPU's dtype; the LoRA weights in float32 either way: peft casts adapters of a
    # bf16 model up to float32.
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=cpu_dtype(), local_files_only=True)
    model.config.use_cache = False
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model: Any = get_peft_model(model, lora)
    peft_model.train()
    causal_lm: Any = peft_model.base_model.model  # the LlamaForCausalLM, with LoRA layers injected

    data = fix_json_data.load(train_file or fix_json_data.TRAIN_FILE)
    examples = [e for e in (_encode(tokenizer, d["broken"], d["fixed"], settings.max_tokens) for d in data) if e]
    if not examples:
        raise ValueError("no training examples fit max_tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in params):
        raise RuntimeError("expected float32 LoRA weights (check the peft version)")
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def lr_factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(settings.steps - settings.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses: list[float] = []
    batches = _batches(examples, settings)
    for step, batch in enumerate(batches, start=1):
        rows = [examples[i] for i in batch]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        # Position t predicts token t+1: the answer tokens are the targets at positions answer_start-1 .. end-2.
        target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (ids, answer_start) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention[r, : len(ids)] = 1
            target_mask[r, answer_start - 1 : len(ids) - 1] = True
        targets = torch.roll(input_ids, shifts=-1, dims=1)[target_mask]
        hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        # The vocabulary projection only where there is a target: most of a step's lm_head cost saved.
        logits = causal_lm.lm_head(hidden[target_mask])
        loss: Any = torch.nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        if on_step is not None:
            on_step(step, len(batches), losses[-1])

    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    head = losses[: min(10, len(losses))]
    tail = losses[-min(10, len(losses)) :]
    report = TrainReport(steps=len(losses), examples=len(examples), seconds=round(time.monotonic() - started, 1),
                         loss_start=round(sum(head) / len(head), 4), loss_end=round(sum(tail) / len(tail), 4),
                         settings=asdict(settings))
    _tidy_adapter_config(out_dir)
    (out_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _tidy_adapter_config(out_dir: Path) -> None:
    """Point the adapter at the catalog's base model rather than a build directory's absolute path."""
    path = out_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _bar_printer(stream: Any) -> StepCallback:
    tty = stream.isatty()

    def show(done: int, total: int, loss: float) -> None:
        width = 24
        filled = round(width * done / total)
        line = f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} steps, loss {loss:.3f}"
        if tty:
            stream.write("\r\x1b[K" + line + ("\n" if done == total else ""))
        elif done == total or done % max(total // 20, 1) == 0:
            stream.write(line + "\n")
        stream.flush()

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Train on a model directory into `--out` (always retrains); the catalog build caches its own copy."""
    import argparse

    parser = argparse.ArgumentParser(description="Train the fix-json LoRA adapter on a model directory.")
    parser.add_argument("--base-dir", type=Path, required=True, help="a Hugging Face model directory (SmolLM2)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    report = train_adapter(args.base_dir, args.out, on_step=_bar_printer(sys.stderr))
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
