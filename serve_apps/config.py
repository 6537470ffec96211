"""The application config: one YAML file, validated with `extra="forbid"`.

Environment variables override the store and secrets (PACKSERVE_REDIS_URL,
PACKSERVE_DATA_DIR, PACKSERVE_ADMIN_TOKEN), so one file serves every
environment.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cluster.settings import AdmissionSettings, PriceSettings, StrictModel
from policies.plans import SizeClass
from policies.pricing import ModelPrice
from serve_apps.engines.types import ModelCard

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
    access_log: bool = False
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


class VllmArgs(StrictModel):
    """The vLLM engine settings packserve controls; anything else is a deliberate omission."""

    model: str  # a local directory or a builtin:name resolved by the catalog builder
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=128)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: str | None = None
    # Always on: prefix-affinity routing and cached-token billing depend on it. Only `true` is accepted.
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=16)
    enable_lora: bool = False
    max_lora_rank: int = Field(16, ge=1)
    max_loras: int = Field(4, ge=1)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    trust_remote_code: bool = False
    kv_cache_space_gib: float | None = Field(None, gt=0, description="CPU backend: VLLM_CPU_KVCACHE_SPACE")

    @model_validator(mode="before")
    @classmethod
    def _refuse_settings_packserve_owns(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "served_model_name" in data:
                raise ValueError("served_model_name is not a setting: a model is served under its catalog `id`, "
                                 "which is the name clients send")
            if data.get("enable_prefix_caching") is False:
                raise ValueError("enable_prefix_caching cannot be turned off: prefix-affinity routing and "
                                 "cached-token billing depend on it")
        return data


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


class SimConfig(StrictModel):
    ttft_ms: float = Field(0, ge=0)
    tokens_per_s: float = Field(0, ge=0)
    # Realism knobs for routing and cold-start benchmarks: prefill time per
    # prompt token not found in the prefix cache, and a one-off engine load.
    prefill_ms_per_uncached_token: float = Field(0, ge=0)
    start_s: float = Field(0, ge=0)


class AppConfig(StrictModel):
    engine: Literal["sim", "vllm"] = "sim"
    store: StoreConfig = StoreConfig()
    admission: AdmissionSettings = AdmissionSettings()
    gateway: GatewayConfig = GatewayConfig()
    sim: SimConfig = SimConfig()
    models: tuple[ModelConfig, ...] = ()
    demo_account: bool = Field(False, description="create a demo account with one standard pack at start")

    @model_validator(mode="after")
    def _unique(self) -> AppConfig:
        ids = [m.id for m in self.models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"model ids listed twice: {', '.join(dupes)}")
        known = set(ids)
        for m in self.models:
            if m.base_model and m.base_model not in known:
                raise ValueError(f"{m.id}: base_model {m.base_model!r} is not in the catalog")
        return self

    def cold_start_timeout(self, model_id: str) -> float:
        """The model's own bound, else its base model's (adapters start with their base), else the gateway's."""
        by_id = {m.id: m for m in self.models}
        m = by_id.get(model_id)
        while m is not None:
            if m.cold_start_timeout_s is not None:
                return m.cold_start_timeout_s
            m = by_id.get(m.base_model) if m.base_model else None
        return self.gateway.cold_start_timeout_s


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
