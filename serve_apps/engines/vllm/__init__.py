"""The vLLM engine: the only package that imports vllm (import-linter holds it to that)."""
