"""S2CoreAttention: the `core_attention` slot of megatron-core's SelfAttention.

A drop-in for megatron's DotProductAttention (same constructor and forward), built from a
ModuleSpec with params {"attention": "s2" | "short" | "full", "group_size": int | None,
"kernel": ..., "eval_attention": "full" | "s2" | "short", "group_size_ratio": float | None}.
`attention` is the pattern while training, `eval_attention` the one in eval() (dense unless an
evaluation asks for the training patterns, tools/eval_ppl.py --eval-attention). A grouped pattern
runs on a full sequence (sq == sk) with G = group_size, or group_size_ratio of the sequence
length when given (one eval model serves several lengths); anything else, a KV-cache decode step
included, gets dense attention that honours megatron's attn_mask_type.
Under context parallel each rank holds a contiguous slice of the sequence: S²-Attn receives a
half-group halo of K/V from the previous rank, dense attention all-gathers K/V
(context_parallel.py).
"""

import math
from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from megalong.attention.context_parallel import cp_dense_attention, cp_s2_attention
from megalong.attention.kernels import KERNELS
from megalong.attention.s2 import dense_causal_attention, s2_attention
from megalong.config.model import (ATTENTION_PATTERNS, GROUPED_PATTERNS, check_short_under_cp,
                                   resolve_group_size)
from megalong.errors import MegalongError


_CAUSAL = (AttnMaskType.causal, AttnMaskType.causal_bottom_right, AttnMaskType.padding_causal)


class S2CoreAttention(MegatronModule):
    """Core attention without parameters: q [sq, b, np, d], k/v [sk, b, ng, d] (this TP
    rank's heads) -> [sq, b, np * d]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, *, attention: str = "s2", group_size: Optional[int] = None,
                 kernel: str = "auto", eval_attention: str = "full",
                 group_size_ratio: Optional[float] = None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        for name, pattern in (("attention", attention), ("eval_attention", eval_attention)):
            if pattern not in ATTENTION_PATTERNS:
                raise MegalongError(f"{name} must be one of {ATTENTION_PATTERNS}, got {pattern!r}")
            if pattern in GROUPED_PATTERNS and not (group_size or group_size_ratio):
                raise MegalongError(f"{name} {pattern!r} needs a group size (--group-size or "
                                    "--group-size-ratio); use 'full' for dense attention")
            check_short_under_cp(pattern, config.context_parallel_size, name)
        if kernel not in KERNELS:
            raise MegalongError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
        if dropout:
            raise MegalongError(f"S2CoreAttention has no attention dropout (got {dropout}); "
                                "set attention_dropout=0.0 as Llama does")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.attention, self.eval_attention, self.kernel = attention, eval_attention, kernel
        self.group_size, self.group_size_ratio = group_size, group_size_ratio
        self.softmax_scale = softmax_scale
        if pg_collection is None:
            self.tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        else:
            self.tp_group = pg_collection.tp
        self.tp_rank, self.tp_size = get_pg_rank(self.tp_group), get_pg_size(self.tp_group)
        # Context parallel: contiguous slices, S²-Attn with a half-group halo, dense attention
        # with all-gathered K/V (attention/context_parallel.py).
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = getattr(pg_collection, "cp", None) or \
                parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise MegalongError("S2CoreAttention supports neither packed sequences (thd) nor "
                                "an attention bias")
        len_q, batch, heads, dim = query.shape
        # megatron's V is a view into the whole qkv output; a kernel that saves it for its
        # backward would keep all of qkv alive. Its own copy is 1/(np/ng + 2) of that.
        value = value.contiguous()
        attend = self._attention(len_q, key.shape[0], dim, attention_mask,
                                 self.attn_mask_type if attn_mask_type is None else attn_mask_type)
        return attend(query, key, value).view(len_q, batch, heads * dim)

    def _attention(self, len_q: int, len_k: int, dim: int, attention_mask, mask_type):
        """The attention this call runs, as a function of (q, k, v)."""
        scale = 1.0 / math.sqrt(dim) if self.softmax_scale is None else self.softmax_scale
        pattern = self.attention if self.training else self.eval_attention
        if pattern in GROUPED_PATTERNS and len_q == len_k:
            # The group mask is causal by construction, so a causal attention_mask adds nothing
            # (SFT padding sits at the end of a sample and is masked out of the loss instead).
            if mask_type not in _CAUSAL:
                raise MegalongError(f"S²-Attn is causal; it cannot apply attn_mask_type "
                                    f"{mask_type.name} (use a causal layer spec)")
            group_size = self._group_size(len_q)

            def grouped(q, k, v):
                kv_heads = k.shape[2]
                heads_of_shard = dict(kv_group_offset=self.tp_rank * kv_heads,
                                      num_kv_groups=kv_heads * self.tp_size,
                                      kernel=self.kernel, softmax_scale=scale)
                if self.cp_group is not None:  # s2 only: "short" is refused under CP
                    return cp_s2_attention(q, k, v, group_size, self.cp_group,
                                           layer=self.layer_number, **heads_of_shard)
                return s2_attention(q, k, v, group_size, shift=pattern == "s2", **heads_of_shard)

            return grouped
        if self.cp_group is not None:
            if len_q != len_k or mask_type not in (AttnMaskType.causal,
                                                   AttnMaskType.causal_bottom_right):
                raise MegalongError(
                    "dense attention under context parallel supports causal masks over whole "
                    f"slices only (got {len_q} queries, {len_k} keys, attn_mask_type "
                    f"{mask_type.name}); decode with --context-parallel-size 1")
            return lambda q, k, v: cp_dense_attention(q, k, v, self.cp_group, softmax_scale=scale)
        causal = mask_type in _CAUSAL
        mask = None if mask_type in (AttnMaskType.no_mask, AttnMaskType.causal) \
            else attention_mask
        return lambda q, k, v: dense_causal_attention(q, k, v, causal=causal, attention_mask=mask,
                                                      softmax_scale=scale)

    def _group_size(self, local_len: int) -> int:
        """G for a sequence whose slice on this rank is local_len tokens: the fixed group size,
        else the ratio of the whole length."""
        seq_len = local_len * (get_pg_size(self.cp_group) if self.cp_group is not None else 1)
        if self.group_size_ratio is None:
            return self.group_size
        return resolve_group_size(seq_len, None, self.group_size_ratio)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """No parameters, nothing to checkpoint."""
        return {}
