"""The deployment graph a config describes, as plain data, without Ray.

`ray_app.build_app` turns these plans into Ray Serve deployments and
`ray_app.dry_run` prints them, so what the tests and `--dry-run` check is
exactly what gets deployed. Every rule that would otherwise surface as a
replica crash minutes into a GPU cold start (a LoRA on a missing base, a
tensor-parallel size larger than the replica's GPUs) is checked here, before
anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from policies.fairness import SchedulerMode
from policies.plans import SizeClass
from serve_apps.config import AppConfig, Autoscaling, ConfigError, ModelConfig, Resources
from serve_apps.engines.sim import SIM_CARDS
from serve_apps.engines.types import STRUCTURED_OUTPUTS, ModelCard

GATEWAY_DEPLOYMENT = "gateway"
MODEL_PREFIX = "model-"
# The simulated engine does almost nothing per request; a full CPU each would
# stop the sim catalog from fitting on a 2-core laptop next to the gateway.
SIM_DEFAULT_CPUS = 0.25

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class DeploymentPlan:
    """One Ray Serve deployment: a base model (with its LoRA adapters) or an embeddings model."""

    name: str
    model_id: str
    kind: str  # "chat" | "embeddings"
    served_ids: tuple[str, ...]  # the base id first, then its adapters
    engine: str  # "sim" | "vllm"
    autoscaling_config: dict[str, Any]
    ray_actor_options: dict[str, Any]
    max_ongoing_requests: int
    engine_args: dict[str, Any] = field(default_factory=dict)
    routing: str = "default"  # "affinity" | "default" (Ray's power of two choices)
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    graceful_shutdown_timeout_s: float = 20.0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_id, "kind": self.kind, "serves": list(self.served_ids),
                "engine": self.engine, "autoscaling_config": dict(self.autoscaling_config),
                "ray_actor_options": dict(self.ray_actor_options),
                "max_ongoing_requests": self.max_ongoing_requests, "engine_args": dict(self.engine_args),
                "routing": self.routing, "router_kwargs": dict(self.router_kwargs),
                "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s}


def deployment_name(model_id: str) -> str:
    """`hf:org/model` → `model-org--model`: Ray names show up in URLs, logs and metrics labels."""
    body = model_id.removeprefix("hf:").replace("/", "--")
    return MODEL_PREFIX + _UNSAFE.sub("_", body)


def sim_model_configs() -> tuple[ModelConfig, ...]:
    """The simulated catalog (SPEC §5) as config entries, for `engine: sim` configs that list no models."""
    return tuple(_sim_model_config(card) for card in SIM_CARDS)


def _sim_model_config(card: ModelCard) -> ModelConfig:
    million = Decimal(1_000_000)
    return ModelConfig(id=card.id, kind=card.kind, size_class=SizeClass(card.size_class),
                       input_price=Decimal(card.input_price_micro) / million,
                       output_price=Decimal(card.output_price_micro) / million,
                       context_length=card.context_length, max_output_tokens=max(card.max_output_tokens, 1),
                       owned_by=card.owned_by, features=card.features,
                       resources=Resources(num_cpus=SIM_DEFAULT_CPUS))


def catalog(config: AppConfig) -> tuple[ModelConfig, ...]:
    """The models this config serves: its own list, or the sim catalog for a sim config that lists none."""
    if config.models or config.engine != "sim":
        return config.models
    return sim_model_configs()


def cards(config: AppConfig) -> dict[str, ModelCard]:
    """What the gateway advertises and admits: every catalog entry, adapters included."""
    return {m.id: m.card() for m in catalog(config)}


def served_models(config: AppConfig, model_id: str) -> tuple[ModelConfig, ...]:
    """A base model and the LoRA adapters that run on its replicas, base first."""
    models = catalog(config)
    base = next((m for m in models if m.id == model_id), None)
    if base is None:
        raise ConfigError(f"model {model_id!r} is not in the catalog")
    return (base, *(m for m in models if m.kind == "lora" and m.base_model == model_id))


# What a model deployment's replicas are built from. The rest of a model's
# entry (prices, weight, owned_by, routing, autoscaling, cold-start timeout)
# is read by the gateway or by Serve, so changing it must not reload a model.
ENGINE_FIELDS = frozenset({"id", "kind", "size_class", "context_length", "max_output_tokens", "features",
                           "base_model", "adapter_path", "vllm"})


def replica_config(config: AppConfig, model_id: str) -> dict[str, Any]:
    """The config a model deployment's replicas get (JSON-mode): its base model and adapters, engine fields only."""
    return {"engine": config.engine, "sim": config.sim.model_dump(mode="json"),
            "store": config.store.model_dump(mode="json", include={"data_dir"}),
            "models": [m.model_dump(mode="json", include=set(ENGINE_FIELDS)) for m in served_models(config, model_id)]}


def gateway_actor_options(config: AppConfig) -> dict[str, Any]:
    """`ray_actor_options` of the gateway deployment (CPU only)."""
    return {"num_cpus": config.gateway.num_cpus}


def autoscaling_config(a: Autoscaling) -> dict[str, Any]:
    out: dict[str, Any] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                           "target_ongoing_requests": a.target_ongoing_requests,
                           "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    if a.initial_replicas is not None:
        out["initial_replicas"] = a.initial_replicas
    if a.look_back_period_s is not None:
        out["look_back_period_s"] = a.look_back_period_s
    return out


def ray_actor_options(r: Resources) -> dict[str, Any]:
    out: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    if r.accelerator_type:
        out["accelerator_type"] = r.accelerator_type
    if r.custom:
        out["resources"] = dict(r.custom)
    return out


def plan(config: AppConfig) -> list[DeploymentPlan]:
    """One plan per chat and embeddings model; raises ConfigError naming the model on any inconsistency."""
    models = catalog(config)
    by_id = {m.id: m for m in models}
    if config.engine == "sim":
        known = {c.id: c.kind for c in SIM_CARDS}
        for m in models:
            if known.get(m.id) != m.kind:
                raise ConfigError(f"{m.id}: the simulated engine serves only its own catalog "
                                  f"({', '.join(sorted(known))}) with the same kinds")
            if STRUCTURED_OUTPUTS in m.features:
                # The gateway would accept response_format, and the output would ignore it.
                raise ConfigError(f"{m.id}: the simulated engine cannot honour the '{STRUCTURED_OUTPUTS}' feature")
    for m in models:
        if m.kind == "lora":
            base = by_id[m.base_model or ""]  # AppConfig already checked the base exists
            if base.kind != "chat":
                raise ConfigError(f"{m.id}: base_model {base.id!r} is a {base.kind} model; adapters need a chat base")
            if config.engine == "vllm" and not m.adapter_path:
                raise ConfigError(f"{m.id}: a LoRA adapter needs adapter_path")

    plans: list[DeploymentPlan] = []
    names: dict[str, str] = {}
    for m in models:
        if m.kind == "lora":
            continue
        name = deployment_name(m.id)
        if name in names:
            raise ConfigError(f"{m.id} and {names[name]} map to the same deployment name {name!r}")
        names[name] = m.id
        if m.autoscaling.target_ongoing_requests > m.max_ongoing_requests:
            raise ConfigError(f"{m.id}: autoscaling.target_ongoing_requests "
                              f"({m.autoscaling.target_ongoing_requests}) exceeds max_ongoing_requests "
                              f"({m.max_ongoing_requests}); replicas would never look busy enough to scale")
        served = served_models(config, m.id)
        # Embeddings have no prefix cache to aim at: Ray's default routing is the right one.
        routing = m.routing if m.kind == "chat" else "default"
        plans.append(DeploymentPlan(
            name=name, model_id=m.id, kind=m.kind, served_ids=tuple(s.id for s in served), engine=config.engine,
            autoscaling_config=autoscaling_config(m.autoscaling), ray_actor_options=ray_actor_options(m.resources),
            max_ongoing_requests=m.max_ongoing_requests + _preemption_headroom(config, m.kind),
            engine_args=_engine_args(config, m, served[1:]),
            routing=routing, router_kwargs=(
                # Several gateway replicas each learn their own table: route unseen conversations to a shared home.
                {"max_queue": m.affinity_max_queue, "shared": config.gateway.autoscaling.max_replicas > 1}
                if routing == "affinity" else {}),
            graceful_shutdown_timeout_s=m.graceful_shutdown_timeout_s))
    return plans


def _engine_args(config: AppConfig, m: ModelConfig, adapters: tuple[ModelConfig, ...]) -> dict[str, Any]:
    if config.engine == "sim":
        return config.sim.model_dump(mode="json")
    if m.vllm is None:
        raise ConfigError(f"{m.id}: engine is vllm but the model has no 'vllm' section")
    # As the replica builds its engine (model_server.make_engine), LoRA on for the catalog's adapters.
    args = m.vllm.with_adapters(len(adapters)).model_dump(mode="json", exclude_none=True)
    gpus = m.resources.num_gpus
    ranks = m.vllm.tensor_parallel_size * m.vllm.pipeline_parallel_size
    # A single rank may share a GPU (num_gpus < 1); more ranks need a GPU each.
    if gpus > 0 and ranks > 1 and ranks > gpus:
        raise ConfigError(f"{m.id}: tensor_parallel_size × pipeline_parallel_size = {ranks} needs {ranks} GPUs "
                          f"per replica but resources.num_gpus is {gpus:g}")
    if gpus == 0 and ranks > 1:
        raise ConfigError(f"{m.id}: tensor/pipeline parallelism needs GPUs (resources.num_gpus is 0)")
    if adapters:
        if m.kind != "chat":
            raise ConfigError(f"{m.id}: only chat models can serve LoRA adapters")
        args["lora_modules"] = {a.id: a.adapter_path for a in adapters}
    return args


def _starting_replicas(a: dict[str, Any]) -> int:
    return max(int(a["min_replicas"]), int(a.get("initial_replicas") or 0))


def local_shortfalls(config: AppConfig, available: Mapping[str, float]) -> list[str]:
    """What the deployments need at their starting replica counts that a machine with `available` lacks.

    `available` is Ray's resource map of that machine (`ray.cluster_resources()`:
    "CPU", "GPU", "accelerator_type:H100", ...). Ray would otherwise leave such a
    replica pending for ever, and `packserve serve` would wait for it in silence.
    """
    demand: list[tuple[str, int, dict[str, Any]]] = [
        (GATEWAY_DEPLOYMENT, _starting_replicas(autoscaling_config(config.gateway.autoscaling)),
         gateway_actor_options(config))]
    demand += [(p.model_id, _starting_replicas(p.autoscaling_config), p.ray_actor_options) for p in plan(config)]
    out: list[str] = []
    for name, _, options in demand:
        accelerator = options.get("accelerator_type")
        if accelerator and available.get(f"accelerator_type:{accelerator}", 0) <= 0:
            out.append(f"{name} needs an {accelerator} GPU (resources.accelerator_type) and this machine has none")
    for resource in sorted({r for _, _, options in demand for r in options.get("resources", {})}):
        needed = sum(count * float(options.get("resources", {}).get(resource, 0)) for _, count, options in demand)
        if needed > available.get(resource, 0) + 1e-9:
            out.append(f"the deployments need {needed:g} of the custom resource {resource!r} (resources.custom) "
                       f"at their starting replicas and this machine has {available.get(resource, 0):g}")
    for key, resource, unit in (("num_cpus", "CPU", "CPUs"), ("num_gpus", "GPU", "GPUs")):
        parts = [(name, count, float(options.get(key) or 0)) for name, count, options in demand]
        needed = sum(count * each for _, count, each in parts)
        if needed > available.get(resource, 0) + 1e-9:
            detail = ", ".join(f"{name} {count}×{each:g}" for name, count, each in parts if count and each)
            out.append(f"the deployments need {needed:g} {unit} at their starting replicas ({detail}) and this "
                       f"machine has {available.get(resource, 0):g}")
    return out


def cpu_engines(config: AppConfig) -> bool:
    """True when `config` runs vLLM engines here and all of them compute on CPU in one worker process.

    Then the machine's CPUs can be split between the engines' OpenMP threads
    and everything else (serve_apps/host/cpu_split.py). A GPU engine (num_gpus > 0)
    needs no split, and a CPU engine with tensor or pipeline parallelism binds
    one CPU list per worker, which the split does not compute.
    """
    if config.engine != "vllm":
        return False
    engines = [m for m in config.models if m.vllm is not None]
    return bool(engines) and all(
        m.resources.num_gpus == 0 and m.vllm.tensor_parallel_size == 1 and m.vllm.pipeline_parallel_size == 1
        for m in engines if m.vllm is not None)


def _preemption_headroom(config: AppConfig, kind: str) -> int:
    """One request more per replica than the scheduler counts, for one dispatched over a full model.

    Ray would otherwise hold the preempting request in its router's arrival-order queue, behind nothing,
    until a sequence freed: exactly the wait preemption is for.
    """
    preempts = config.scheduler.preempt and config.scheduler.mode is SchedulerMode.FAIR
    return 1 if preempts and kind == "chat" else 0
