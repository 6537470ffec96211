"""The application config: one YAML file, validated with `extra="forbid"`.

Environment variables override the store and secrets (PACKSERVE_REDIS_URL,
PACKSERVE_DATA_DIR, PACKSERVE_ADMIN_TOKEN), so one file serves every
environment.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cluster.alerts import AlertSettings
from cluster.observations import ObservationSettings
from cluster.plan_settings import PlansSettings
from cluster.settings import AdmissionSettings, PriceSettings, SchedulerSettings, StrictModel
from policies.plans import SizeClass
from policies.pricing import ModelPrice, WeightBasis
from serve_apps.engines.types import ModelCard
from serve_apps.engines.vllm_args import VllmArgs

MIB = 1024 * 1024


class ConfigError(ValueError):
    pass


class StoreConfig(StrictModel):
    redis_url: str | None = None
    data_dir: Path | None = None


class Autoscaling(StrictModel):
    """Passed through to Ray Serve's `autoscaling_config`."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)
    # Ray averages load over this window (its default is 30 s): a model set to
    # scale to zero stays up until the window holds no request at all.
    look_back_period_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class GatewayConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(32 * MIB, ge=1024)
    # Invalid API keys one source address may present per minute (counted across
    # gateways in the store) before it is answered 429 instead of 401.
    auth_failures_per_minute: int = Field(30, ge=1)
    access_log: bool = False
    # `packserve gateway` (uvicorn): a connection that has not sent a complete
    # request's headers this long after it opened, or after its previous
    # response, is closed (408 if part of a request came). Under Ray Serve the
    # HTTP proxy is Ray's (docs/survives.md).
    header_timeout_s: float = Field(10, gt=0)
    # How long an idle keep-alive connection is kept; None: the server's own
    # default (uvicorn 5 s, Ray Serve 90 s, which suits a cloud load balancer in front).
    keep_alive_timeout_s: int | None = Field(None, ge=1)
    # `packserve gateway`: a second port answering GET /health from a thread of its own, so a probe is
    # answered at once while the event loop is saturated; 503 once the loop has not run for
    # `health_stall_s` (wedged, not busy). None: only /health on the API port.
    health_port: int | None = Field(None, ge=0, le=65535)
    health_stall_s: float = Field(10, gt=0)
    # Under Ray Serve (`packserve serve`): the gateway is the ingress deployment.
    # Every open stream is an ongoing request, and the gateway queues by
    # account itself, so Ray's default cap of 5 would throttle it for nothing.
    max_ongoing_requests: int = Field(2048, ge=1)
    num_cpus: float = Field(1, ge=0)
    autoscaling: Autoscaling = Field(
        default_factory=lambda: Autoscaling(min_replicas=1, max_replicas=1, target_ongoing_requests=256))
    # How long a request for a model at zero replicas waits for one to start
    # (before admission: the wait is never charged); past it, 503 + Retry-After.
    cold_start_timeout_s: float = Field(600, gt=0)
    # Under Ray Serve: how long a gateway replica being replaced (a redeploy that
    # changed it, a scale-down) keeps serving its open streams before Serve
    # kills it. Ray's default is 20 s; a coding agent's stream often runs
    # longer. Stopping `packserve serve` waits for it too when streams are open.
    graceful_shutdown_timeout_s: float = Field(20, ge=0)


class Resources(StrictModel):
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    accelerator_type: str | None = None
    # Ray custom resources a replica needs, e.g. {"model_node": 1}: nodes started with
    # `ray start --resources '{"model_node": 4}'` take it (placement across a cluster's nodes).
    custom: dict[str, float] = Field(default_factory=dict)

    @field_validator("custom")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory") or not name or amount < 0:
                raise ValueError(f"custom resource {name!r}: a name other than CPU, GPU and memory, "
                                 "with an amount of 0 or more")
        return value


# What a LoRA adapter takes from its base model: it is served by the base model's deployment.
BASE_DEPLOYMENT_FIELDS = frozenset({"vllm", "autoscaling", "resources", "max_ongoing_requests", "routing",
                                    "affinity_max_queue", "max_inflight", "graceful_shutdown_timeout_s"})


class ModelConfig(StrictModel):
    id: str
    kind: Literal["chat", "embeddings", "lora"] = "chat"
    size_class: SizeClass = SizeClass.STANDARD
    input_price: Decimal = Field(Decimal(0), ge=0, description="$ per million input tokens")
    output_price: Decimal = Field(Decimal(0), ge=0, description="$ per million output tokens")
    weight: Decimal | None = Field(None, ge=0, description="override of the price-derived request weight")
    context_length: int = Field(8192, ge=1)
    max_output_tokens: int = Field(4096, ge=1)
    owned_by: str = "packserve"
    features: tuple[str, ...] = ("streaming",)
    base_model: str | None = Field(None, description="for kind: lora, the catalog id it runs on")
    adapter_path: str | None = None
    vllm: VllmArgs | None = None
    autoscaling: Autoscaling = Autoscaling()
    resources: Resources = Resources()
    max_ongoing_requests: int = Field(64, ge=1)
    # Chat models: "affinity" sends requests sharing a prefix to the replica
    # that holds it (serve_apps.deploy.routing); "default" is Ray's power of two choices.
    routing: Literal["affinity", "default"] = "affinity"
    # The preferred replica is passed over once it has more requests than this in flight.
    affinity_max_queue: int = Field(8, ge=0)
    cold_start_timeout_s: float | None = Field(None, gt=0, description="overrides gateway.cold_start_timeout_s")
    # Sequences one replica runs at once, for the capacity scheduler (times live replicas); by default
    # the engine's own limit (vllm.max_num_seqs, sim.max_seqs). A LoRA adapter shares its base's.
    max_inflight: int | None = Field(None, ge=1)
    # As the gateway's: how long a replica being replaced finishes its open generations.
    graceful_shutdown_timeout_s: float = Field(20, ge=0)

    @field_validator("id")
    @classmethod
    def _hf_style(cls, value: str) -> str:
        if not value.startswith("hf:") or "/" not in value or value.endswith("/"):
            raise ValueError(f"model id {value!r} must look like 'hf:org/model'")
        return value

    @model_validator(mode="after")
    def _kinds(self) -> ModelConfig:
        if self.kind == "lora" and not self.base_model:
            raise ValueError(f"{self.id}: a lora model needs base_model")
        if self.kind == "embeddings" and self.size_class is not SizeClass.UNMETERED:
            raise ValueError(f"{self.id}: embeddings models are unmetered (size_class: unmetered)")
        # A setting nothing reads is refused: an operator who writes it expects it to work. Compared with
        # the defaults (not the fields given), so a config dumped and validated again (a replica's) passes.
        if self.kind == "lora":
            taken = sorted(f for f in BASE_DEPLOYMENT_FIELDS if _differs_from_default(self, f))
            if taken:
                raise ValueError(f"{self.id}: a LoRA adapter runs on the replicas of its base model "
                                 f"{self.base_model}, which sets {', '.join(taken)}; set them there")
        else:
            for name, value in (("base_model", self.base_model), ("adapter_path", self.adapter_path)):
                if value is not None:
                    raise ValueError(f"{self.id}: {name} is a setting of LoRA adapters (kind: lora), "
                                     f"not of {self.kind} models")
        if self.kind == "embeddings" and self.max_inflight is not None:
            raise ValueError(f"{self.id}: embeddings requests do not wait for model capacity; max_inflight is a "
                             "setting of chat models")
        if self.kind == "embeddings" and self.vllm is not None:
            vllm = self.vllm
            unread = sorted(f for f in type(vllm).model_fields if f != "model" and _differs_from_default(vllm, f))
            if unread:
                raise ValueError(f"{self.id}: embeddings models run on transformers, which read only vllm.model "
                                 f"of the vllm section, not {', '.join(unread)}")
        return self

    def price(self) -> ModelPrice:
        return PriceSettings(input=self.input_price, output=self.output_price, size_class=self.size_class,
                             weight=self.weight).to_price()

    def card(self) -> ModelCard:
        price = self.price()
        return ModelCard(id=self.id, kind=self.kind, size_class=self.size_class.value,
                         input_price_micro=price.input_micro, output_price_micro=price.output_micro,
                         context_length=self.context_length, max_output_tokens=self.max_output_tokens,
                         owned_by=self.owned_by, features=self.features, base_model=self.base_model)


def _differs_from_default(model: StrictModel, name: str) -> bool:
    default = type(model).model_fields[name].get_default(call_default_factory=True)
    return bool(getattr(model, name) != default)


class SimConfig(StrictModel):
    ttft_ms: float = Field(0, ge=0)
    tokens_per_s: float = Field(0, ge=0)
    # Realism knobs for routing and cold-start benchmarks: prefill time per
    # prompt token not found in the prefix cache, and a one-off engine load.
    prefill_ms_per_uncached_token: float = Field(0, ge=0)
    start_s: float = Field(0, ge=0)
    # Sequences each simulated model runs at once (more wait inside the engine in arrival order,
    # as in vLLM's waiting queue); None: unlimited.
    max_seqs: int | None = Field(None, ge=1)


class AppConfig(StrictModel):
    engine: Literal["sim", "vllm"] = "sim"
    store: StoreConfig = StoreConfig()
    admission: AdmissionSettings = AdmissionSettings()
    gateway: GatewayConfig = GatewayConfig()
    sim: SimConfig = SimConfig()
    scheduler: SchedulerSettings = SchedulerSettings()
    models: tuple[ModelConfig, ...] = ()
    demo_account: bool = Field(False, description="create a demo account with one standard pack at start")
    plans: PlansSettings = PlansSettings()
    alerts: AlertSettings = AlertSettings()
    console: ObservationSettings = ObservationSettings()

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_mode(cls, value: object) -> object:
        # `scheduler: fifo` is short for `scheduler: {mode: fifo}`.
        return {"mode": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique(self) -> AppConfig:
        if self.engine == "sim":
            with_vllm = [m.id for m in self.models if m.vllm is not None]
            if with_vllm:
                raise ValueError(f"engine is sim, so the vllm sections of {', '.join(with_vllm)} would be ignored; "
                                 "set engine: vllm or remove them")
        else:
            with_sim = [f"sim.{name}" for name in SimConfig.model_fields if _differs_from_default(self.sim, name)]
            if with_sim:
                raise ValueError(f"engine is vllm, so {', '.join(with_sim)} would be ignored (they set up the "
                                 "simulated engine); set engine: sim or remove them")
        ids = [m.id for m in self.models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"model ids listed twice: {', '.join(dupes)}")
        known = set(ids)
        for m in self.models:
            if m.base_model and m.base_model not in known:
                raise ValueError(f"{m.id}: base_model {m.base_model!r} is not in the catalog")
        return apply_plan_weights(self)

    def queue_model(self, model_id: str) -> str:
        """The model whose replicas run `model_id`: its base for a LoRA adapter (they share one capacity)."""
        by_id = {m.id: m for m in self.models}
        m = by_id.get(model_id)
        return m.base_model if m is not None and m.kind == "lora" and m.base_model else model_id

    def seqs_per_replica(self, model_id: str) -> int | None:
        """Sequences one replica of `model_id` runs at once; None: unlimited (the simulated engine by default)."""
        by_id = {m.id: m for m in self.models}
        m = by_id.get(model_id)
        if m is not None and m.max_inflight is not None:
            return m.max_inflight
        if self.engine == "vllm" and m is not None and m.vllm is not None:
            # Ray Serve sends a replica at most max_ongoing_requests and queues the rest in arrival order
            # in its router: more than that is not the engine's to run.
            return min(m.vllm.max_num_seqs, m.max_ongoing_requests)
        if self.engine == "sim" and (m is None or m.kind != "embeddings"):
            return self.sim.max_seqs
        return None

    def cold_start_timeout(self, model_id: str) -> float:
        """The model's own bound, else its base model's (adapters start with their base), else the gateway's."""
        by_id = {m.id: m for m in self.models}
        m = by_id.get(model_id)
        while m is not None:
            if m.cold_start_timeout_s is not None:
                return m.cold_start_timeout_s
            m = by_id.get(m.base_model) if m.base_model else None
        return self.gateway.cold_start_timeout_s


def apply_plan_weights(config: AppConfig) -> AppConfig:
    """Fold `plans.weights` and the cache discount into `admission` and the catalog entries.

    The controller keeps reading one weight policy and each model's price card;
    the `plans` block is where an operator writes them.
    """
    plans = config.plans
    admission = config.admission
    update: dict[str, object] = {}
    if plans.cache_read_discount_percent is not None:
        update["cache_read_discount_percent"] = plans.cache_read_discount_percent
    weights = plans.weights
    models = config.models
    if weights is not None:
        defaults = AdmissionSettings()
        if (admission.reference_price, admission.weight_basis) != (defaults.reference_price, defaults.weight_basis):
            raise ValueError("set the weight rule in plans.weights or in admission "
                             "(reference_price, weight_basis), not both")
        by_id = {m.id: m for m in models}
        for model_id in (*weights.overrides, *weights.unmetered,
                         *((weights.reference_model,) if weights.reference_model else ())):
            if model_id not in by_id:
                raise ValueError(f"plans.weights names {model_id!r}, which is not in models")
        if weights.reference_model is not None:
            ref = by_id[weights.reference_model]
            reference = ref.input_price if weights.basis is WeightBasis.INPUT else ref.output_price
            if reference <= 0:
                raise ValueError(f"the reference model {ref.id} has no {weights.basis.value} price")
        else:
            assert weights.reference_price is not None
            reference = weights.reference_price
        update |= {"reference_price": reference, "weight_basis": weights.basis}
        models = tuple(
            m.model_copy(update={"weight": weights.overrides[m.id]}) if m.id in weights.overrides
            else m.model_copy(update={"size_class": SizeClass.UNMETERED}) if m.id in weights.unmetered
            else m
            for m in models)
    if not update:
        return config
    return config.model_copy(update={"admission": admission.model_copy(update=update), "models": models})


def load_config(path: Path | None) -> AppConfig:
    """Load and validate; every problem is a ConfigError with the file and field named."""
    if path is None:
        return AppConfig()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    try:
        return AppConfig.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: {where}: {err['msg']}") from None
