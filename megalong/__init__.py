"""megalong: LongLoRA-style context extension of Llama models on megatron-core."""

from megalong import runtime as _runtime


__version__ = "0.1.0"

# megatron-core warns while it is imported (runtime/patches.py, group "import"): before it is.
_runtime.apply_patches("import")
