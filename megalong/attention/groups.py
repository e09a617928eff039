"""S²-Attn group semantics (DESIGN.md §5) as pure functions on tensors; no process groups.

Sequence-major layout throughout: x is [s, b, heads, d].
- A query head is *shifted* iff its global index >= nh // 2 (LongLoRA: the second half of the
  heads). The global index of local head h is kv_group_offset * (h_local // h_kv_local) + h.
- Unshifted heads attend causally within groups [0, G), [G, 2G), ...
- Shifted heads attend causally within [0, G/2), [G/2, 3G/2), ..., [N - G/2, N): the two end
  groups are half size. No wrap-around, so no token ever sees a later one.

A *fold* turns one half of the heads into "pieces" [groups * b, L, heads, d] (groups folded
into the batch), views of x where the layout allows; `unfold_into` is its inverse. Since every
token lies in exactly one group, fold is a permutation and unfold is its adjoint.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch


def group_bounds(seq_len: int, group_size: int, shifted: bool) -> List[int]:
    """Token boundaries of the groups: [0, G, ..., N] or [0, G/2, 3G/2, ..., N - G/2, N]."""
    N, G = seq_len, group_size
    if not shifted:
        return list(range(0, N + 1, G))
    return [0] + list(range(G // 2, N, G)) + [N]


def first_shifted_head(num_heads: int, num_kv_heads: int, kv_group_offset: int = 0,
                       num_kv_groups: Optional[int] = None) -> int:
    """Local index of the first shifted query head (num_heads when none is shifted).

    num_heads / num_kv_heads are this shard's counts; kv_group_offset is the global index of
    local kv group 0 and num_kv_groups the global kv-group count (default: all are local)."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_heads}) must be a positive multiple of kv heads ({num_kv_heads})"
        )
    num_kv_groups = num_kv_heads if num_kv_groups is None else num_kv_groups
    if kv_group_offset < 0 or kv_group_offset + num_kv_heads > num_kv_groups:
        raise ValueError(
            f"local kv groups [{kv_group_offset}, {kv_group_offset + num_kv_heads}) do not lie "
            f"within the {num_kv_groups} global kv groups"
        )
    heads_per_kv = num_heads // num_kv_heads
    total_heads = num_kv_groups * heads_per_kv
    first_global = kv_group_offset * heads_per_kv
    return min(max(total_heads // 2 - first_global, 0), num_heads)


@dataclass(frozen=True)
class HeadHalf:
    """Local query heads [q_start, q_end) sharing one grouping, and the kv heads they read.

    kv_of_head[i] is query head q_start + i's kv head, counted from kv_start. gqa_direct says
    whether the grouped-query convention (query head i reads kv head i // (heads / kv heads))
    already gives that mapping; it does not when a kv group straddling the two halves leaves a
    partial group next to whole ones (odd kv-group counts), and then K/V are expanded."""

    shifted: bool
    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    kv_of_head: Tuple[int, ...]

    @property
    def gqa_direct(self) -> bool:
        heads, kv_heads = self.q_end - self.q_start, self.kv_end - self.kv_start
        if heads % kv_heads:
            return False
        return all(kv == i // (heads // kv_heads) for i, kv in enumerate(self.kv_of_head))


def head_halves(num_heads: int, num_kv_heads: int, kv_group_offset: int = 0,
                num_kv_groups: Optional[int] = None, shift: bool = True) -> List[HeadHalf]:
    """The non-empty halves (unshifted first) of this shard's query heads. shift=False is the
    "short" ablation pattern: every head unshifted, so one half holds them all."""
    split = first_shifted_head(num_heads, num_kv_heads, kv_group_offset, num_kv_groups)
    if not shift:
        split = num_heads
    heads_per_kv = num_heads // num_kv_heads
    halves = []
    for shifted, q_start, q_end in ((False, 0, split), (True, split, num_heads)):
        if q_start < q_end:
            kv_start, kv_end = q_start // heads_per_kv, (q_end - 1) // heads_per_kv + 1
            kv_of_head = tuple(h // heads_per_kv - kv_start for h in range(q_start, q_end))
            halves.append(HeadHalf(shifted, q_start, q_end, kv_start, kv_end, kv_of_head))
    return halves


def _to_batch(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups * L, b, H, d] -> [groups * b, L, H, d]; a view when b == 1."""
    s, b, H, d = x.shape
    return x.view(groups, s // groups, b, H, d).transpose(1, 2).reshape(groups * b, s // groups, H, d)


def _write_from_batch(out: torch.Tensor, piece: torch.Tensor, accumulate: bool) -> None:
    """out [groups * L, b, H, d] <- (or +=) piece [groups * b, L, H, d]."""
    s, b, H, d = out.shape
    L = piece.shape[1]
    src = piece.reshape(s // L, b, L, H, d).transpose(1, 2)
    dst = out.view(s // L, L, b, H, d)
    if accumulate:
        dst.add_(src)
    else:
        dst.copy_(src)


def fold(x: torch.Tensor, group_size: int, shifted: bool) -> List[torch.Tensor]:
    """x [N, b, H, d] -> pieces [groups * b, L, H, d], each attended causally on its own.

    Unshifted: one piece, N/G groups of G. Shifted: the two half-size end groups as one piece
    of 2 groups (the only copy, G tokens), then the middle N - G tokens as N/G - 1 groups of G
    (omitted when G == N)."""
    N, G = x.shape[0], group_size
    if not shifted:
        return [_to_batch(x, N // G)]
    half = G // 2
    pieces = [_to_batch(torch.cat([x[:half], x[N - half:]]), 2)]
    if N > G:
        pieces.append(_to_batch(x[half:N - half], N // G - 1))
    return pieces


def unfold_into(out: torch.Tensor, pieces: List[torch.Tensor], group_size: int,
                shifted: bool, accumulate: bool = False) -> torch.Tensor:
    """Inverse of `fold`: write (or add) pieces into out [N, b, H, d], which may be strided."""
    N, G = out.shape[0], group_size
    if not shifted:
        _write_from_batch(out, pieces[0], accumulate)
        return out
    half, b = G // 2, out.shape[1]
    _write_from_batch(out[:half], pieces[0][:b], accumulate)
    _write_from_batch(out[N - half:], pieces[0][b:], accumulate)
    if N > G:
        _write_from_batch(out[half:N - half], pieces[1], accumulate)
    return out


def pieces_per_span(seq_len: int, group_size: int, shifted: bool) -> int:
    """How many pieces `fold` makes."""
    return 1 if not shifted else (2 if seq_len > group_size else 1)


# Head spans are (start, end, shifted) ranges over dim 2. Folding each span of one tensor and
# unfolding the results are autograd Functions that are each other's backward, so gradients
# are assembled straight into one tensor: no zero-filled slice gradients summed afterwards.


def _fold_all(x, spans, group_size):
    return tuple(p for start, end, shifted in spans
                 for p in fold(x[:, :, start:end], group_size, shifted))


class _FoldSpans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spans, group_size):
        ctx.spans, ctx.group_size, ctx.shape = spans, group_size, x.shape
        return _fold_all(x, spans, group_size)

    @staticmethod
    def backward(ctx, *grads):
        spans, group_size, shape = ctx.spans, ctx.group_size, ctx.shape
        covered = [0] * shape[2]
        for start, end, _ in spans:
            covered[start:end] = [c + 1 for c in covered[start:end]]
        overlap = any(c != 1 for c in covered)
        grad = grads[0].new_zeros(shape) if overlap else grads[0].new_empty(shape)
        taken = 0
        for start, end, shifted in spans:
            count = pieces_per_span(shape[0], group_size, shifted)
            unfold_into(grad[:, :, start:end], list(grads[taken:taken + count]), group_size,
                        shifted, accumulate=overlap)
            taken += count
        return grad, None, None


class _UnfoldSpans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spans, group_size, shape, *pieces):
        ctx.spans, ctx.group_size = spans, group_size
        out = pieces[0].new_empty(shape)
        taken = 0
        for start, end, shifted in spans:
            count = pieces_per_span(shape[0], group_size, shifted)
            unfold_into(out[:, :, start:end], list(pieces[taken:taken + count]), group_size, shifted)
            taken += count
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, None, None) + _fold_all(grad, ctx.spans, ctx.group_size)


def fold_spans(x: torch.Tensor, spans, group_size: int) -> List[torch.Tensor]:
    """`fold` applied to each head span of x, pieces concatenated in span order."""
    return list(_FoldSpans.apply(x, tuple(spans), group_size))


def unfold_spans(pieces, spans, group_size: int, shape) -> torch.Tensor:
    """Inverse of `fold_spans` for non-overlapping spans covering all heads of `shape`."""
    return _UnfoldSpans.apply(tuple(spans), group_size, tuple(shape), *pieces)


# Index tensors built from host data are cached per device: on a GPU each build is a
# host-to-device copy that synchronises the stream, and the same few tensors are asked for by
# every layer, every step and again in the recompute. Callers must not modify them.
_device_constants: Dict[tuple, torch.Tensor] = {}


def cache_device(device) -> torch.device:
    """The device as a cache key: None is the CPU, a bare "cuda" the current GPU (tensors
    report their index, so both spellings must meet)."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cached(key: tuple, device, build) -> torch.Tensor:
    device = cache_device(device)
    key = (*key, device)
    if key not in _device_constants:
        _device_constants[key] = build().to(device)
    return _device_constants[key]


def cu_seqlens(seq_len: int, group_size: int, shifted: bool, batch: int,
               device=None) -> torch.Tensor:
    """int32 group boundaries of `batch` sequences laid end to end (for varlen kernels);
    built once per (N, G, shifted, b, device)."""

    def build():
        bounds = group_bounds(seq_len, group_size, shifted)
        flat = [k * seq_len + t for k in range(batch) for t in bounds[:-1]] + [batch * seq_len]
        return torch.tensor(flat, dtype=torch.int32)

    return _cached(("cu_seqlens", seq_len, group_size, shifted, batch), device, build)


def cu_seqlens_both_halves(seq_len: int, group_size: int, batch: int,
                           device=None) -> torch.Tensor:
    """cu_seqlens of 2·b sequences: b with the unshifted groups, then b with the shifted ones
    (both head halves in one varlen call); built once per (N, G, b, device)."""

    def build():
        unshifted = cu_seqlens(seq_len, group_size, False, batch)
        shifted = cu_seqlens(seq_len, group_size, True, batch)
        return torch.cat([unshifted[:-1], shifted + batch * seq_len])

    return _cached(("cu_seqlens_both_halves", seq_len, group_size, batch), device, build)


def varlen_tokens(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] -> [b·s, h, d]: the b sequences end to end, as varlen kernels take them."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


def kv_head_index(half: HeadHalf, device=None) -> torch.Tensor:
    """`half.kv_of_head` as an index tensor (for index_select where K/V are expanded to one
    head per query head); built once per (mapping, device)."""
    return _cached(("kv_of_head", half.kv_of_head), device,
                   lambda: torch.tensor(half.kv_of_head, dtype=torch.long))
