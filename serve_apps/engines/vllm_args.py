"""`VllmArgs`: the vLLM engine arguments packserve sets, as one model from the config file to the engine.

The config validates it (a model's `vllm:` section), the deployment plan shows
it (`--dry-run`), and the replica hands it to `engines.vllm.engine.VllmEngine`
as it is, with only the model resolved to a directory and LoRA turned on for
the adapters the catalog serves on it. Defined outside `engines/vllm` so the
config can import it without reaching vllm.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cluster.settings import StrictModel


class VllmArgs(StrictModel):
    """The vLLM engine settings packserve controls; anything else is a deliberate omission."""

    # A local directory, a hub id, or `builtin:NAME` (the embedded catalog's build); the replica's
    # engine gets it resolved to a directory (`for_replica`).
    model: str
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=128)  # None: vLLM derives it from the model's config
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

    def with_adapters(self, adapters: int) -> VllmArgs:
        """LoRA on, with a place for each, when the catalog serves `adapters` adapters on this model.

        Forgetting the flag would only show up as a vLLM error on the first adapter request.
        """
        if adapters == 0:
            return self
        return self.model_copy(update={"enable_lora": True, "max_loras": max(self.max_loras, adapters)})

    def for_replica(self, model_dir: str, adapters: int) -> VllmArgs:
        """What a replica's engine is built from: the model resolved to `model_dir`, LoRA for its adapters."""
        return self.with_adapters(adapters).model_copy(update={"model": model_dir})
