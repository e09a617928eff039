"""Rotate-half RoPE applied to q and k as one autograd Function, in megatron's fused-RoPE slot.

megatron's unfused path (`_apply_rotary_pos_emb_bshd`) computes `t*cos + rotate_half(t)*sin`
with a negation, two concatenations (the rotation, then the empty unrotated part), two products
and an add, and autograd adds as many again backward: about 27 passes over q or k in all.
The H100 profile named RoPE's concatenations among the step's elementwise costs.

`rotate_half_rope` computes `t*cos`, then subtracts `t2*sin` from its first half and adds
`t1*sin` to its second: about 15 passes forward and backward (`benchmarks/rope.py` counts
them). Every product is rounded and then summed as megatron's path rounds it, so outputs and
gradients are bit for bit megatron's (tested). It saves only cos and sin, as megatron's does.

megatron leaves `rope_utils.fused_apply_rotary_pos_emb` to Transformer Engine and calls it when
`apply_rope_fusion` is set; the runtime's `fill_fused_rope_slot` patch puts this kernel there
when TE has not (model/llama.py asks it while building a model's config)."""

import torch
from megatron.core.models.common.embeddings import rope_utils


def _halves(x: torch.Tensor):
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _rotate(x, cos, sin, transpose: bool) -> torch.Tensor:
    """x·R (transpose=False) or x·Rᵀ, R the rotation `t -> t*cos + rotate_half(t)*sin`."""
    (x1, x2), (s1, s2) = _halves(x), _halves(sin)
    out = x * cos  # full width: torch's CPU kernels run bf16 half-rows ~4x slower an element
    o1, o2 = _halves(out)
    if transpose:  # what autograd computes through megatron's cat, negation and products
        o1.add_(x2 * s2)
        o2.sub_(x1 * s1)
    else:
        o1.sub_(x2 * s1)
        o2.add_(x1 * s2)
    return out


class RotateHalfRope(torch.autograd.Function):
    """t [s, b, h, d] (any strides), cos and sin [s, 1, 1, d] in t's dtype -> RoPE'd t."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, transpose=True), None, None


def rotate_half_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False,
                     **_te_only) -> torch.Tensor:
    """megatron's `fused_apply_rotary_pos_emb(t, freqs, interleaved=...)` contract. Interleaved
    pairs or a partly rotated head go to megatron's unfused path (Llama uses neither)."""
    if interleaved or freqs.shape[-1] != t.shape[-1]:
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return RotateHalfRope.apply(t, torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype))

