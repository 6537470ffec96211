"""Every vLLM name packserve uses that vLLM does not promise to keep, in one place.

vLLM's stable surface is `vllm serve`, `LLM`, `SamplingParams` and the engine
arguments; packserve also drives the engine in-process (`AsyncLLM`), subclasses
its multiprocess executor, patches the shared-memory queue's spin, and reuses
its server's tool and reasoning parsers. Each of those names is listed in
`VENDOR_NAMES` with the parameters or attributes packserve relies on, and
reached through a function here, so tests/test_vendor_compat.py can check the
whole list against the installed vLLM: an upgrade that renames or reshapes one
fails there, by name, instead of as an AttributeError in a replica (or, for the
spin patch, as a silently lost CPU).

Importing this module does not import vllm; each accessor does.
"""

from __future__ import annotations

from typing import Any

from serve_apps.vendor import VendorName

# The release these names were checked against (pyproject.toml pins it).
PINNED_VERSION = "0.32.0"


_EXECUTOR = "vllm.v1.executor.multiproc_executor"
_SHM = "vllm.distributed.device_communicators.shm_broadcast"

# The executor packserve subclasses (executor.SleepingMultiprocExecutor) and the hooks it overrides.
MULTIPROC_EXECUTOR = VendorName(_EXECUTOR, "MultiprocExecutor", attrs=("response_mqs",))
EXECUTOR_INIT = VendorName(_EXECUTOR, "MultiprocExecutor._init_executor", params=("self",))
EXECUTOR_POST_INIT = VendorName(_EXECUTOR, "MultiprocExecutor._post_init_executor", params=("self",))
EXECUTOR_RPC = VendorName(_EXECUTOR, "MultiprocExecutor.collective_rpc", params=("self", "method", "args", "kwargs"))
# The response queue's spin (executor.pace_reads replaces its wait and turns its busy loop off).
MESSAGE_QUEUE = VendorName(_SHM, "MessageQueue", attrs=("_spin_condition",))
SPIN_CONDITION = VendorName(_SHM, "SpinCondition.__init__", params=("busy_loop_s",), attrs=("busy_loop_s",))
SPIN_WAIT = VendorName(_SHM, "SpinCondition.wait", params=("self", "timeout_ms"))
SPIN_RECORD_READ = VendorName(_SHM, "SpinCondition.record_read", params=("self",))
# The in-process engine (v1 module path) and what engine.VllmEngine calls on it.
ASYNC_LLM = VendorName("vllm.v1.engine.async_llm", "AsyncLLM")
ASYNC_LLM_FROM_ARGS = VendorName("vllm.v1.engine.async_llm", "AsyncLLM.from_engine_args", params=("engine_args",))
ASYNC_LLM_GENERATE = VendorName("vllm.v1.engine.async_llm", "AsyncLLM.generate",
                                params=("prompt", "sampling_params", "request_id", "lora_request"))
ASYNC_LLM_ABORT = VendorName("vllm.v1.engine.async_llm", "AsyncLLM.abort", params=("request_id",))
ASYNC_LLM_SHUTDOWN = VendorName("vllm.v1.engine.async_llm", "AsyncLLM.shutdown")
ASYNC_LLM_UNFINISHED = VendorName("vllm.v1.engine.async_llm", "AsyncLLM.get_num_unfinished_requests")
ASYNC_LLM_CHECK_HEALTH = VendorName("vllm.v1.engine.async_llm", "AsyncLLM.check_health", params=("self",))
# Engine arguments packserve sets by name (engine.VllmEngine._create_engine).
ENGINE_ARGS = VendorName("vllm.engine.arg_utils", "AsyncEngineArgs", fields=(
    "model", "tokenizer", "served_model_name", "dtype", "enforce_eager", "enable_prefix_caching",
    "tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs", "max_num_batched_tokens", "enable_lora",
    "max_lora_rank", "max_loras", "gpu_memory_utilization", "kv_cache_memory_bytes", "quantization",
    "trust_remote_code", "disable_log_stats", "enable_log_requests", "structured_outputs_config",
    "max_model_len", "distributed_executor_backend"))
STRUCTURED_OUTPUTS_CONFIG = VendorName("vllm.config", "StructuredOutputsConfig",
                                       fields=("backend", "disable_any_whitespace", "reasoning_parser"))
TOKENS_INPUT = VendorName("vllm.inputs.engine", "tokens_input", params=("prompt_token_ids", "prompt"))
CLIENT_ERROR = VendorName("vllm.exceptions", "VLLMClientError")
CURRENT_PLATFORM = VendorName("vllm.platforms", "current_platform")
# vLLM's server internals reused for tool calls and reasoning in streamed text.
REASONING_PARSERS = VendorName("vllm.reasoning", "ReasoningParserManager.get_reasoning_parser", params=("name",))
TOOL_PARSERS = VendorName("vllm.tool_parsers", "ToolParserManager.get_tool_parser", params=("name",))
CHAT_COMPLETION_REQUEST = VendorName("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest",
                                     fields=("messages", "model", "tools", "tool_choice", "skip_special_tokens"))
# The CPU binding serve_apps/host/cpu_split.py mirrors (vLLM's `auto` rule; it reads the machine, so it
# cannot be called on a topology given as data) and the id-list format it hands back to vLLM.
AUTOBIND_RULE = VendorName("vllm.utils.ompmultiprocessing", "OMPProcessManager._get_autobind_cpu_ids",
                           params=("self", "cpu_selector"))
PARSE_ID_LIST = VendorName("vllm.utils.cpu_resource_utils", "parse_id_list", params=("raw_str",))

VENDOR_NAMES: tuple[VendorName, ...] = (
    MULTIPROC_EXECUTOR, EXECUTOR_INIT, EXECUTOR_POST_INIT, EXECUTOR_RPC, MESSAGE_QUEUE, SPIN_CONDITION, SPIN_WAIT,
    SPIN_RECORD_READ, ASYNC_LLM, ASYNC_LLM_FROM_ARGS, ASYNC_LLM_GENERATE, ASYNC_LLM_ABORT, ASYNC_LLM_SHUTDOWN,
    ASYNC_LLM_UNFINISHED, ASYNC_LLM_CHECK_HEALTH, ENGINE_ARGS, STRUCTURED_OUTPUTS_CONFIG, TOKENS_INPUT,
    CLIENT_ERROR, CURRENT_PLATFORM, REASONING_PARSERS, TOOL_PARSERS, CHAT_COMPLETION_REQUEST, AUTOBIND_RULE,
    PARSE_ID_LIST,
)


def multiproc_executor() -> type[Any]:
    """The class `executor.SleepingMultiprocExecutor` subclasses."""
    cls: type[Any] = MULTIPROC_EXECUTOR.load()
    return cls


def spin_condition(queue: Any) -> Any:
    """The `SpinCondition` a response `MessageQueue` waits on (vLLM keeps it private)."""
    return getattr(queue, MESSAGE_QUEUE.attrs[0])


def async_llm() -> type[Any]:
    cls: type[Any] = ASYNC_LLM.load()
    return cls


def tokens_input(prompt_token_ids: list[int], *, prompt: str | None = None) -> Any:
    """The engine input for a prompt packserve rendered and tokenized itself."""
    return TOKENS_INPUT.load()(prompt_token_ids, prompt=prompt)


def client_error() -> type[BaseException]:
    """vLLM's exception for a request at fault (its own server answers 4xx)."""
    cls: type[BaseException] = CLIENT_ERROR.load()
    return cls


def on_cpu() -> bool:
    return bool(CURRENT_PLATFORM.load().is_cpu())


def reasoning_parser(name: str) -> Any:
    """The reasoning parser class vLLM's server registers as `name`."""
    return REASONING_PARSERS.load()(name)


def tool_parser(name: str) -> Any:
    """The tool-call parser class vLLM's server registers as `name`."""
    return TOOL_PARSERS.load()(name)


def chat_completion_request(**fields: Any) -> Any:
    """vLLM's server-side OpenAI request model, which its tool parsers read."""
    return CHAT_COMPLETION_REQUEST.load()(**fields)


def parse_id_list(text: str) -> list[int]:
    """How vLLM reads VLLM_CPU_OMP_THREADS_BIND's CPU list."""
    ids: list[int] = PARSE_ID_LIST.load()(text)
    return ids


def make_shutdown_idempotent(engine: Any) -> None:
    """After `engine.shutdown()`: make `AsyncLLM.__del__`'s second call a no-op.

    At interpreter exit vLLM's module globals are already gone when `__del__`
    runs, and its repeat shutdown prints a traceback; the work is done.
    """
    engine.shutdown = _already_shut_down


def _already_shut_down(*_: Any, **__: Any) -> None:
    return None
