"""S²-Attn as one FlexAttention call per layer: the whole sequence, per-head masks.

Nothing is folded, copied or expanded: flex reads q/k/v in place (permuted views), handles GQA
itself and skips every (q block, kv block) tile that holds no allowed pair. The mask is the
contract of DESIGN.md §5 (see groups.py): kv <= q and both in the same group, groups offset
by G/2 for shifted heads, no wrap-around.

Eager flex (the CPU path) materialises the full score matrix and has no backward on CPU in
torch 2.13, so it is for tests; the training path is CUDA, where one compiled flex function
serves every layer.
"""

import math
from typing import Dict, Optional

import torch

from megalong.attention.groups import cache_device, first_shifted_head as _first_shifted
from megalong.config.model import check_group_size


try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError as _err:  # pragma: no cover - depends on the installed torch
    BlockMask = flex_attention = None
    _IMPORT_ERROR: Optional[ImportError] = _err
else:
    _IMPORT_ERROR = None


def s2_mask_mod(group_size: int, first_shifted_head: int, head_offset: int, *, device=None):
    """FlexAttention mask_mod for S²-Attn: (b, h, q_idx, kv_idx) -> bool tensor.

    h is the local head index; head_offset + h is the global one, shifted iff it is
    >= first_shifted_head. The parameters are captured as 0-d tensors on `device`, not Python
    ints: compiled flex lifts captured tensors into buffers and guards only on their
    dtype/shape, so a different G or head split reuses the compiled kernel."""
    device = cache_device(device)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    G, half = as_tensor(group_size), as_tensor(group_size // 2)
    first_local = as_tensor(first_shifted_head - head_offset)

    def mask_mod(b, h, q_idx, kv_idx):
        shift = (h >= first_local).to(torch.int32) * half
        return (kv_idx <= q_idx) & ((q_idx + shift) // G == (kv_idx + shift) // G)

    return mask_mod


def _pattern_blocks(seq_len: int, group_size: int, shift: int, block: int, device):
    """(any, full) [nb, nb] bool for one head pattern, from per-block token bounds only.

    Groups are contiguous and grp() is non-decreasing, so a q block and a kv block share an
    allowed pair iff some kv <= some q and their group ranges overlap (exact for kv blocks at
    or before the q block); every pair is allowed iff all kv <= all q and both blocks lie in
    one group."""
    first = torch.arange(0, seq_len, block, device=device)
    last = first + block - 1
    g_first, g_last = (first + shift) // group_size, (last + shift) // group_size
    q_first, q_last, q_g_first, q_g_last = (x[:, None] for x in (first, last, g_first, g_last))
    kv_first, kv_last, kv_g_first, kv_g_last = (x[None, :] for x in (first, last, g_first, g_last))
    any_ = (kv_first <= q_last) & (q_g_first <= kv_g_last) & (kv_g_first <= q_g_last)
    full = (kv_last <= q_first) & (kv_g_first == q_g_last)
    return any_, full


def _ordered(dense: torch.Tensor):
    """[..., nb, nb] bool -> (count [..., nb], indices [..., nb, nb]) int32, listed blocks
    first in ascending order (flex's kv_num_blocks / kv_indices)."""
    nb = dense.shape[-1]
    cols = torch.arange(nb, device=dense.device)
    # Unlisted columns sort after listed ones; they stay valid indices that flex never reads.
    key = torch.where(dense, cols, cols + nb)
    return dense.sum(-1, dtype=torch.int32), key.sort(dim=-1).values.remainder(nb).to(torch.int32)


_block_masks: Dict[tuple, "BlockMask"] = {}


def s2_block_mask(seq_len: int, group_size: int, *, num_heads: int, head_offset: int,
                  first_shifted_head: int, block_size: int = 128, device=None) -> "BlockMask":
    """BlockMask [1, num_heads, N, N] (broadcast over batch) for S²-Attn, cached per key.

    Built from block bounds: memory O(num_heads * (N / block)^2), never N x N. Tiles that are
    entirely allowed are "full" (flex skips the mask_mod there); the rest of the tiles with an
    allowed pair are partial and get the mask_mod. block = min(block_size, N) must divide N."""
    if _IMPORT_ERROR is not None:
        raise ImportError(f"FlexAttention needs torch >= 2.5: {_IMPORT_ERROR}")
    device = cache_device(device)
    key = (seq_len, group_size, num_heads, head_offset, first_shifted_head, block_size, device)
    if key in _block_masks:
        return _block_masks[key]
    check_group_size(seq_len, group_size)
    block = min(block_size, seq_len)
    if block <= 0 or seq_len % block:
        raise ValueError(
            f"S²-Attn flex kernel: sequence length N={seq_len} is not a multiple of the "
            f"FlexAttention block size {block}; use N divisible by {block} (or a block size "
            "that divides N; on CUDA keep it a multiple of 64, default 128)"
        )
    patterns = [_pattern_blocks(seq_len, group_size, shift, block, device)
                for shift in (0, group_size // 2)]
    any_ = torch.stack([a for a, _ in patterns])
    full = torch.stack([f for _, f in patterns])
    count, indices = _ordered(any_ & ~full)
    full_count, full_indices = _ordered(full)
    # Only two head patterns exist; each head picks its row of the stacked (unshifted, shifted).
    which = torch.tensor([int(head_offset + h >= first_shifted_head) for h in range(num_heads)],
                         device=device)
    mask = BlockMask.from_kv_blocks(
        count[which][None], indices[which][None], full_count[which][None],
        full_indices[which][None], BLOCK_SIZE=block,
        mask_mod=s2_mask_mod(group_size, first_shifted_head, head_offset, device=device),
        seq_lengths=(seq_len, seq_len),
    )
    _block_masks[key] = mask
    return mask


# One compiled flex for the process, made on first CUDA use. dynamic=False: it recompiles for
# a new N, batch, head count, head dim, dtype or scale (shapes and constants), not for a new G or
# head split, whose values live in mask_mod's captured tensors and the BlockMask's indices.
_compiled_flex = None


def _flex_for(device: torch.device):
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class FlexKernel:
    """torch FlexAttention on the whole sequence, one call per layer (CUDA training; CPU
    forward only, for tests)."""

    name, layout, supports_gqa = "flex", "whole", True

    def __init__(self):
        if _IMPORT_ERROR is not None:
            raise ImportError(f"FlexAttention needs torch >= 2.5: {_IMPORT_ERROR}")

    def attend_whole(self, q, k, v, group_size: int, *, kv_group_offset: int = 0,
                     num_kv_groups: Optional[int] = None, scale: Optional[float] = None,
                     block_size: int = 128, shift: bool = True) -> torch.Tensor:
        """q [N, b, h, d], k/v [N, b, h_kv, d] -> [N, b, h, d], contiguous (flex lays its output
        out like q, which megatron hands over as a strided view of the qkv output); heads are
        this shard's, kv_group_offset/num_kv_groups/shift as in s2_attention."""
        seq_len, _, heads, dim = q.shape
        kv_heads = k.shape[2]
        if q.device.type == "cpu" and any(x.requires_grad for x in (q, k, v)):
            if torch.is_grad_enabled():
                raise NotImplementedError(
                    "attention kernel 'flex' has no backward on CPU (torch FlexAttention); "
                    "train on CUDA or use kernel 'sdpa'"
                )
            # Under no_grad nothing needs the graph; CPU flex rejects requires_grad inputs.
            q, k, v = q.detach(), k.detach(), v.detach()
        # Canonical key: local head offset 0 with the local first shifted head, so shards and
        # models with the same local split share one BlockMask.
        first_local = _first_shifted(heads, kv_heads, kv_group_offset, num_kv_groups)
        if not shift:
            first_local = heads  # no head is shifted
        block_mask = s2_block_mask(seq_len, group_size, num_heads=heads, head_offset=0,
                                   first_shifted_head=first_local, block_size=block_size,
                                   device=q.device)
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        out = _flex_for(q.device)(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
            block_mask=block_mask, scale=scale, enable_gqa=heads != kv_heads,
        )
        return out.permute(2, 0, 1, 3).contiguous()
