"""megalong: LongLoRA-style context extension of Llama models on megatron-core."""

__version__ = "0.1.0"
