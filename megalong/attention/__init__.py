"""S²-Attn: group semantics (groups.py), kernels (kernels.py), the attention functions (s2.py)
and the megatron-core core-attention module (core_attention.py, imported on first use so the
functions work without megatron-core)."""

from megalong.attention.groups import GroupSizeError, check_group_size
from megalong.attention.kernels import KernelUnavailableError, available_kernels
from megalong.attention.s2 import dense_causal_attention, s2_attention

__all__ = [
    "GroupSizeError",
    "KernelUnavailableError",
    "S2CoreAttention",
    "available_kernels",
    "check_group_size",
    "dense_causal_attention",
    "s2_attention",
]


def __getattr__(name):
    if name == "S2CoreAttention":
        from megalong.attention.core_attention import S2CoreAttention

        return S2CoreAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
