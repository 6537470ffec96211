"""Scheduler settings and model capacity from the config: what the capacity scheduler is told."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from policies.fairness import SchedulerMode
from serve_apps.cli.gateway_main import with_command_line
from serve_apps.config import AppConfig, ConfigError, ModelConfig, load_config
from serve_apps.gateway.app import model_capacity

VLLM_MODELS: list[dict[str, Any]] = [
    {"id": "hf:org/chat", "kind": "chat", "vllm": {"model": "/m", "max_num_seqs": 16}},
    {"id": "hf:org/capped", "kind": "chat", "max_inflight": 3, "vllm": {"model": "/m", "max_num_seqs": 16}},
    {"id": "hf:org/adapter", "kind": "lora", "base_model": "hf:org/chat"},
    {"id": "hf:org/wide", "kind": "chat", "max_ongoing_requests": 64, "vllm": {"model": "/m"}},
    {"id": "hf:org/embed", "kind": "embeddings", "size_class": "unmetered"},
]


def test_scheduler_defaults_to_fair_and_takes_the_short_form() -> None:
    assert AppConfig().scheduler.mode is SchedulerMode.FAIR
    assert AppConfig.model_validate({"scheduler": "fifo"}).scheduler.mode is SchedulerMode.FIFO
    full = AppConfig.model_validate({"scheduler": {"mode": "fair", "queue_timeout_s": 5, "payg_weight": 3}})
    assert (full.scheduler.queue_timeout_s, full.scheduler.payg_weight) == (5, 3)


@pytest.mark.parametrize("bad", [{"scheduler": "lottery"}, {"scheduler": {"payg_weight": 11}},
                                 {"scheduler": {"surprise": 1}}, {"sim": {"max_seqs": 0}}])
def test_bad_scheduler_settings_fail_loudly(tmp_path: Path, bad: dict[str, object]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError):
        load_config(path)


def test_the_wait_bound_and_lease_fall_back_to_admissions() -> None:
    config = AppConfig.model_validate({"admission": {"queue_timeout_s": 12, "lease_ttl_s": 9}})
    assert config.scheduler.timeout_s(config.admission) == 12
    assert config.scheduler.lease_ttl_ms(config.admission) == 9000
    own = AppConfig.model_validate({"scheduler": {"queue_timeout_s": 2, "lease_ttl_s": 1.5}})
    assert own.scheduler.timeout_s(own.admission) == 2 and own.scheduler.lease_ttl_ms(own.admission) == 1500


def test_sim_capacity_is_max_seqs_times_one_replica_and_unlimited_by_default() -> None:
    assert model_capacity(AppConfig())("hf:packserve/sim-large") is None
    config = with_command_line(AppConfig(), 4, "fifo")
    assert config.scheduler.mode is SchedulerMode.FIFO
    assert model_capacity(config)("hf:packserve/sim-large") == 4
    with pytest.raises(ValueError, match="sim-max-seqs"):
        with_command_line(AppConfig(), 0, None)


def test_vllm_capacity_follows_live_replicas_and_max_inflight() -> None:
    config = AppConfig.model_validate({"engine": "vllm", "models": VLLM_MODELS})
    replicas = {"hf:org/chat": 3, "hf:org/capped": 2}
    capacity = model_capacity(config, replicas.get)
    assert capacity("hf:org/chat") == 48  # max_num_seqs x running replicas
    assert capacity("hf:org/capped") == 6  # max_inflight overrides the engine's limit
    assert capacity("hf:org/embed") is None
    # vLLM's default 256 sequences, but Ray Serve sends a replica at most its max_ongoing_requests.
    assert capacity("hf:org/wide") == 64
    assert config.queue_model("hf:org/adapter") == "hf:org/chat"  # adapters share their base's sequences
    replicas["hf:org/chat"] = 0  # scaled to zero: requests wait for its cold start before admission
    assert capacity("hf:org/chat") == 16
    assert model_capacity(config)("hf:org/chat") == 16  # replicas unknown: one


@pytest.mark.parametrize(("scheduler", "headroom"), [({}, 1), ({"preempt": False}, 0), ({"mode": "fifo"}, 0)])
def test_ray_admits_one_request_more_per_chat_replica_when_the_scheduler_preempts(
        scheduler: dict[str, object], headroom: int) -> None:
    from serve_apps.deploy.serving_plan import plan

    models = [m for m in VLLM_MODELS if m["kind"] == "chat"]
    config = AppConfig.model_validate({"engine": "vllm", "models": models, "scheduler": scheduler})
    ongoing = {p.model_id: p.max_ongoing_requests for p in plan(config)}
    assert ongoing["hf:org/wide"] == 64 + headroom
    assert ongoing["hf:org/chat"] == ModelConfig.model_fields["max_ongoing_requests"].default + headroom
    # The scheduler still counts the configured figure: the extra request is the preempting one.
    assert model_capacity(config)("hf:org/wide") == 64


def test_preemption_is_on_by_default_and_the_command_line_switches_it() -> None:
    assert AppConfig().scheduler.preempt
    assert not with_command_line(AppConfig(), None, None, preempt=False).scheduler.preempt
    assert with_command_line(AppConfig.model_validate({"scheduler": {"preempt": False}}), None, None,
                             preempt=True).scheduler.preempt
