"""The embedded default catalog: model conversion, the fix-json LoRA adapter and its data."""
