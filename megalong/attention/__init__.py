"""S²-Attn: group semantics (groups.py), kernels (kernels.py), the attention functions (s2.py),
context parallel (context_parallel.py) and the megatron-core core-attention module
(core_attention.py)."""

from megalong.attention.kernels import KernelUnavailableError, available_kernels
from megalong.attention.s2 import dense_causal_attention, s2_attention
from megalong.config.model import GroupSizeError, check_group_size


__all__ = [
    "GroupSizeError",
    "KernelUnavailableError",
    "available_kernels",
    "check_group_size",
    "dense_causal_attention",
    "s2_attention",
]

