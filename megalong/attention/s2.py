"""S²-Attn (training) and dense causal attention (eval, decode) on [s, b, heads, d] tensors."""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megalong.attention.groups import (cu_seqlens, cu_seqlens_both_halves, fold_spans, head_halves,
                                       kv_head_index, pieces_per_span, unfold_spans, varlen_tokens)
from megalong.attention.kernels import resolve_kernel
from megalong.config.model import check_group_size


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"expected q [s, b, h, d] and k, v [s, b, h_kv, d]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch or head dim, or "
            "the query heads are not a multiple of the kv heads"
        )


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, *,
                 kv_group_offset: int = 0, num_kv_groups: Optional[int] = None,
                 kernel: str = "auto", softmax_scale: Optional[float] = None,
                 shift: bool = True) -> torch.Tensor:
    """Shifted sparse attention. q [N, b, h, d], k/v [N, b, h_kv, d] (RoPE applied) ->
    [N, b, h, d]. kv_group_offset / num_kv_groups: global index of local kv group 0 and the
    global kv-group count, so a tensor-parallel shard computes its slice of the full function.
    shift=False gives the paper's "short" ablation pattern: every head attends within the
    unshifted groups. Cost grows as N * G; no N x N mask exists."""
    _check_qkv(q, k, v)
    seq_len, batch, heads, dim = q.shape
    if k.shape[0] != seq_len:
        raise ValueError(f"S²-Attn needs as many keys as queries; got {k.shape[0]} and {seq_len}")
    check_group_size(seq_len, group_size)
    impl = resolve_kernel(kernel, q.device, q.dtype)
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale
    if impl.layout == "whole":  # one masked call on the unfolded sequence (flex)
        return impl.attend_whole(q, k, v, group_size, kv_group_offset=kv_group_offset,
                                 num_kv_groups=num_kv_groups, scale=scale, shift=shift)
    halves = head_halves(heads, k.shape[2], kv_group_offset, num_kv_groups, shift)
    if impl.layout == "varlen":
        return _s2_varlen(impl, q, k, v, halves, group_size, scale)
    q_spans = [(h.q_start, h.q_end, h.shifted) for h in halves]
    kv_spans = [(h.kv_start, h.kv_end, h.shifted) for h in halves]
    owners = [h for h in halves for _ in range(pieces_per_span(seq_len, group_size, h.shifted))]
    folded = zip(owners, fold_spans(q, q_spans, group_size), fold_spans(k, kv_spans, group_size),
                 fold_spans(v, kv_spans, group_size))
    results = [impl.attend(q_piece, *_kv_for(half, impl, k_piece, v_piece), scale)
               for half, q_piece, k_piece, v_piece in folded]
    return unfold_spans(results, q_spans, group_size, q.shape)


def _kv_for(half, impl, k, v):
    """K/V as the kernel needs them: grouped-query when it can, else one kv head per query."""
    if half.gqa_direct and impl.supports_gqa:
        return k, v
    index = kv_head_index(half, k.device)
    return k.index_select(2, index), v.index_select(2, index)


def _packable(halves, impl, kv_heads: int) -> bool:
    """Both halves fit one varlen call as 2·b sequences of equal head counts: the same number
    of query heads, their kv heads split evenly between them, and no K/V expansion needed."""
    if len(halves) != 2:
        return False
    first, second = halves
    same_heads = first.q_end - first.q_start == second.q_end - second.q_start
    kv_split = (first.gqa_direct and second.gqa_direct and first.kv_end == second.kv_start
                and first.kv_end - first.kv_start == second.kv_end - second.kv_start)
    return same_heads and kv_split and (impl.supports_gqa or 2 * first.q_end == kv_heads)


def _pack_halves(x: torch.Tensor) -> torch.Tensor:
    """[N, b, 2·h, d] -> [2·b·N, h, d]: the unshifted heads' b sequences, then the shifted
    heads' (one copy, as the per-half layout makes; x may be a strided view of megatron's qkv
    output)."""
    seq_len, batch, heads, dim = x.shape
    return x.reshape(seq_len, batch, 2, heads // 2, dim).permute(2, 1, 0, 3, 4) \
        .reshape(2 * batch * seq_len, heads // 2, dim)


def _unpack_halves(tokens: torch.Tensor, seq_len: int, batch: int) -> torch.Tensor:
    """Inverse of `_pack_halves`."""
    _, heads, dim = tokens.shape
    return tokens.view(2, batch, seq_len, heads, dim).permute(2, 1, 0, 3, 4) \
        .reshape(seq_len, batch, 2 * heads, dim)


def _s2_varlen(impl, q, k, v, halves, group_size, scale):
    """Tokens of all groups end to end, cu_seqlens at group bounds: both halves in one call
    (LongLoRA's layout: 2·b sequences of half the heads) where their head counts match, else
    one call per half."""
    seq_len, batch = q.shape[:2]
    if _packable(halves, impl, k.shape[2]):
        bounds = cu_seqlens_both_halves(seq_len, group_size, batch, device=q.device)
        res = impl.attend_varlen(*(_pack_halves(x) for x in (q, k, v)), bounds, group_size,
                                 scale)
        return _unpack_halves(res, seq_len, batch)
    out = q.new_empty(q.shape)
    for half in halves:
        k_half, v_half = _kv_for(half, impl, k[:, :, half.kv_start:half.kv_end],
                                 v[:, :, half.kv_start:half.kv_end])
        tokens = [varlen_tokens(x) for x in (q[:, :, half.q_start:half.q_end], k_half, v_half)]
        bounds = cu_seqlens(seq_len, group_size, half.shifted, batch, device=q.device)
        longest = group_size // 2 if half.shifted and seq_len == group_size else group_size
        res = impl.attend_varlen(*tokens, bounds, longest, scale)
        out[:, :, half.q_start:half.q_end] = res.view(batch, seq_len, *res.shape[1:]).transpose(0, 1)
    return out


def causal_mask_bottom_right(len_q: int, len_k: int, device=None) -> torch.Tensor:
    """Boolean [len_q, len_k], True where query i (at absolute position len_k - len_q + i) may
    attend key j."""
    return torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(len_k - len_q)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           causal: bool = True, attention_mask: Optional[torch.Tensor] = None,
                           softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Full attention for eval and inference. q [sq, b, h, d], k/v [sk, b, h_kv, d] ->
    [sq, b, h, d]. causal aligns the mask bottom-right (query i sits at position sk - sq + i,
    as with a KV cache). attention_mask (broadcastable to [b, h, sq, sk]) is megatron's
    convention: True means masked out; it combines with `causal`."""
    _check_qkv(q, k, v)
    len_q, len_k = q.shape[0], k.shape[0]
    if causal and len_q > len_k:
        raise ValueError(f"causal attention with more queries ({len_q}) than keys ({len_k})")
    mask, is_causal = None, False
    if causal and len_q == len_k and attention_mask is None:
        is_causal = True  # SDPA's own (top-left) alignment is right when sq == sk
    elif causal and len_q > 1:
        mask = causal_mask_bottom_right(len_q, len_k, q.device)
    if attention_mask is not None:
        mask = ~attention_mask if mask is None else mask & ~attention_mask
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
        attn_mask=mask, is_causal=is_causal, scale=softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.permute(2, 0, 1, 3).contiguous()
