"""Context parallel S²-Attn (DESIGN.md §6): contiguous slices and a half-group halo, no ring.

With CP size c, rank r holds tokens [rL, (r+1)L), L = N/c a multiple of G/2. Every slice start
is then a group boundary for one head half; for the other half the group containing rL began
exactly G/2 tokens earlier, inside rank r-1's slice. So rank r needs, for the kv heads of that
straddling half only, K and V of the last G/2 tokens of rank r-1 (the *halo*); everything else
is local. Causality means nothing flows the other way in the forward pass; the backward pass
returns dK/dV of the halo to rank r-1.

The module has three parts:
- the plan and the local math, pure functions without process groups: `halo_plan` says which
  half receives and which sends, `s2_attention_on_slice` computes a slice's S²-Attn outputs
  from its q/k/v and the halo (tested against the full-sequence `s2_attention`);
- the exchange: `_HaloExchange`, an autograd Function doing one p2p per layer (K and V packed
  into one tensor) forward and one backward, and `HALO_COUNTER`, the bytes it received;
- `cp_s2_attention` and `cp_dense_attention`, what S2CoreAttention calls under CP.
Volumes (per rank, per layer, per micro-batch) are `halo_bytes` and, for comparison,
`ring_bytes`: what ring attention moves for the same shapes.
"""

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megalong.attention.groups import (HeadHalf, cu_seqlens, head_halves, kv_head_index,
                                       varlen_tokens)
from megalong.attention.kernels import resolve_kernel
from megalong.attention.s2 import dense_causal_attention, s2_attention
from megalong.errors import MegalongError


# ------------------------------------------------------------------ plan (pure)


def group_start(position: int, group_size: int, shifted: bool) -> int:
    """Global start of the group holding token `position` (bounds as groups.group_bounds)."""
    G = group_size
    if not shifted:
        return position - position % G
    if position < G // 2:
        return 0
    return position - (position - G // 2) % G


def _next_group_start(position: int, group_size: int, shifted: bool) -> int:
    """First group bound after `position`, which must itself be a bound."""
    if shifted and position == 0:
        return group_size // 2
    return position + group_size


def check_slice(start: int, local_len: int, group_size: int) -> None:
    half = group_size // 2
    if start % half or local_len % half or local_len < half:
        raise MegalongError(
            f"a context-parallel slice [{start}, {start + local_len}) must start at a multiple of "
            f"G/2 = {half} and hold a positive multiple of G/2 tokens (S²-Attn group size "
            f"G = {group_size}); use a context-parallel size c with seq-length / c a multiple of "
            f"{half}")


def straddling_half(halves, boundary: int, group_size: int) -> Optional[HeadHalf]:
    """The half (of `halves`) whose group containing `boundary` began before it, or None:
    the shifted half when boundary % G == 0 (and boundary > 0), else the unshifted one."""
    for half in halves:
        if group_start(boundary, group_size, half.shifted) < boundary:
            return half
    return None


@dataclass(frozen=True)
class HaloPlan:
    """What CP rank r exchanges per layer: `recv` is the local half whose first group began in
    rank r-1's slice (None on rank 0 or when this TP shard holds no such head), `send` the
    local half whose last group continues into rank r+1's slice (None on the last rank)."""

    halo_len: int  # G/2 tokens
    recv: Optional[HeadHalf]
    send: Optional[HeadHalf]

    @property
    def recv_kv_heads(self) -> int:
        return 0 if self.recv is None else self.recv.kv_end - self.recv.kv_start

    @property
    def send_kv_heads(self) -> int:
        return 0 if self.send is None else self.send.kv_end - self.send.kv_start


def halo_plan(num_heads: int, num_kv_heads: int, group_size: int, local_len: int, cp_rank: int,
              cp_size: int, kv_group_offset: int = 0,
              num_kv_groups: Optional[int] = None) -> HaloPlan:
    """The exchange of CP rank `cp_rank` for this TP shard's heads (as `head_halves`)."""
    check_slice(cp_rank * local_len, local_len, group_size)
    halves = head_halves(num_heads, num_kv_heads, kv_group_offset, num_kv_groups)
    start, end = cp_rank * local_len, (cp_rank + 1) * local_len
    recv = straddling_half(halves, start, group_size) if cp_rank > 0 else None
    send = straddling_half(halves, end, group_size) if cp_rank < cp_size - 1 else None
    return HaloPlan(group_size // 2, recv, send)


def halo_bytes(group_size: int, kv_heads: int, head_dim: int, micro_batch: int,
               bytes_per_element: int) -> int:
    """Forward halo per rank per layer: G/2 tokens x kv heads of the straddling half x d x 2
    (K and V) x micro-batch x bytes. The backward pass returns as many bytes again."""
    return group_size // 2 * kv_heads * head_dim * 2 * micro_batch * bytes_per_element


def ring_bytes(seq_len: int, cp_size: int, kv_heads: int, head_dim: int, micro_batch: int,
               bytes_per_element: int) -> int:
    """Ring attention's forward K/V traffic per rank per layer for the same shapes: every rank
    receives the other c-1 slices, (c-1)/c x N x kv heads (all local ones) x d x 2 x b x bytes."""
    return (cp_size - 1) * (seq_len // cp_size) * kv_heads * head_dim * 2 * micro_batch \
        * bytes_per_element


# ------------------------------------------------------------------ local math (pure)


def s2_attention_on_slice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                          start: int, halo=None, *, kv_group_offset: int = 0,
                          num_kv_groups: Optional[int] = None, kernel: str = "auto",
                          softmax_scale: Optional[float] = None) -> torch.Tensor:
    """S²-Attn outputs [L, b, h, d] of the queries at global positions [start, start + L).

    q [L, b, h, d], k/v [L, b, h_kv, d] hold those tokens (RoPE applied at their global
    positions); start and L are multiples of G/2. `halo` is (k, v) [G/2, b, n, d] of tokens
    [start - G/2, start) for the kv heads [kv_start, kv_end) of the straddling half (see
    `halo_plan`), needed exactly when that half is local and start > 0.
    Equal to `s2_attention` on the whole sequence, sliced (the tests check it)."""
    seq_len, _, heads, dim = q.shape
    check_slice(start, seq_len, group_size)
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    halves = head_halves(heads, k.shape[2], kv_group_offset, num_kv_groups)
    outputs = []
    for half in halves:
        needs_halo = group_start(start, group_size, half.shifted) < start
        if needs_halo and halo is None:
            raise ValueError(f"the {'shifted' if half.shifted else 'unshifted'} heads' group "
                             f"straddles token {start}: pass the halo of rank r-1")
        outputs.append(_half_on_slice(
            half, q[:, :, half.q_start:half.q_end], k[:, :, half.kv_start:half.kv_end],
            v[:, :, half.kv_start:half.kv_end], group_size, start,
            halo if needs_halo else None, kernel, scale))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _per_query_head(half: HeadHalf, x: torch.Tensor) -> torch.Tensor:
    """K/V with one head per query head where the grouped-query mapping does not hold."""
    if half.gqa_direct:
        return x
    return x.index_select(2, kv_head_index(half, x.device))


def _half_on_slice(half, q, k, v, group_size, start, halo, kernel, scale):
    """One head half over the slice, in up to four pieces: the straddling first group, a
    partial first group (only the shifted half at token 0), the run of whole groups (S²-Attn's
    grouped kernel), and a partial last group. Partial groups are plain causal attention: one
    group is dense attention."""
    k, v = _per_query_head(half, k), _per_query_head(half, v)
    seq_len, G, pieces, pos = q.shape[0], group_size, [], 0
    if halo is not None:
        halo_len = G // 2
        halo_k, halo_v = (_per_query_head(half, x) for x in halo)
        pieces.append(_straddling_group(q[:halo_len], torch.cat([halo_k, k[:halo_len]]),
                                        torch.cat([halo_v, v[:halo_len]]), kernel, scale))
        pos = halo_len
    first_end = min(_next_group_start(start + pos, G, half.shifted) - start, seq_len)
    if pos < first_end and first_end - pos < G:
        pieces.append(dense_causal_attention(q[pos:first_end], k[pos:first_end], v[pos:first_end],
                                             softmax_scale=scale))
        pos = first_end
    whole = (seq_len - pos) // G * G
    if whole:
        # Every head of this call takes the unshifted grouping: S²-Attn shifts heads whose
        # global index is >= half of all heads, so declare these heads the first half of 2x.
        span = slice(pos, pos + whole)
        pieces.append(s2_attention(q[span], k[span], v[span], G, kv_group_offset=0,
                                   num_kv_groups=2 * k.shape[2], kernel=kernel,
                                   softmax_scale=scale))
        pos += whole
    if pos < seq_len:
        pieces.append(dense_causal_attention(q[pos:], k[pos:], v[pos:], softmax_scale=scale))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _straddling_group(q, k, v, kernel: str, scale: float) -> torch.Tensor:
    """Our G/2 queries [G/2, b, h, d] over the group's G keys (rank r-1's halo, then ours),
    causal aligned bottom-right. A varlen kernel takes that as it is: segments of G/2 queries
    and G keys, which FlashAttention-2 aligns bottom-right (3/4 of a whole group's work).
    Otherwise the group runs whole, its first G/2 queries zeros and their outputs dropped: plain
    top-left causal attention, which SDPA's flash kernels run; G/2 queries over G keys through
    SDPA need a mask or bias, which on an H100 took 1.8x (bool mask) or 1.4x (torch's
    lower-right causal bias) the time of the padded group (benchmarks/cp_slice.py)."""
    length, batch, heads, dim = q.shape
    impl = resolve_kernel(kernel, q.device, q.dtype)
    if impl.layout != "varlen":
        padded = dense_causal_attention(torch.cat([q.new_zeros(q.shape), q]), k, v,
                                        softmax_scale=scale)
        return padded[length:]
    if not impl.supports_gqa and k.shape[2] != heads:
        k, v = (x.repeat_interleave(heads // k.shape[2], dim=2) for x in (k, v))
    tokens = [varlen_tokens(x) for x in (q, k, v)]
    out = impl.attend_varlen(*tokens, cu_seqlens(length, length, False, batch, q.device), length,
                             scale, cu_seqlens_k=cu_seqlens(2 * length, 2 * length, False, batch,
                                                            q.device),
                             max_seqlen_k=2 * length)
    return out.view(batch, length, heads, dim).transpose(0, 1)


# ------------------------------------------------------------------ the exchange


class HaloCounter:
    """Bytes this rank received through the halo exchange, per layer number and direction
    ("forward": K/V halos from rank r-1, recompute included; "backward": their gradients
    from rank r+1). Reset it per step to read a step's traffic."""

    DIRECTIONS = ("forward", "backward")

    def __init__(self):
        self.received = defaultdict(lambda: dict.fromkeys(self.DIRECTIONS, 0))

    def add(self, layer: int, direction: str, received: int) -> None:
        self.received[layer][direction] += received

    def reset(self) -> None:
        self.received.clear()

    def per_layer(self) -> dict:
        """{"forward": bytes, "backward": bytes} received: the largest count over this rank's
        layers (all layers move the same amount; the max also covers pipeline stages without
        one)."""
        return {d: max((counts[d] for counts in self.received.values()), default=0)
                for d in self.DIRECTIONS}

    def per_layer_max_over_ranks(self, group=None) -> dict:
        """`per_layer()` received, maxed over the ranks of `group` (default: all): rank 0
        receives nothing forward and the last CP rank nothing backward. A collective."""
        mine = self.per_layer()
        counts = torch.tensor([mine[d] for d in self.DIRECTIONS], dtype=torch.int64)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
        return dict(zip(self.DIRECTIONS, counts.tolist()))


HALO_COUNTER = HaloCounter()


@dataclass(frozen=True)
class HaloLink:
    """One layer's exchange on one rank: the plan, the CP group and its neighbours' global
    ranks (None at the ends of the group), and the layer number the counter files it under."""

    plan: HaloPlan
    group: object
    prev_rank: Optional[int]
    next_rank: Optional[int]
    layer: int


def _p2p(send: Optional[torch.Tensor], send_to: Optional[int], recv: Optional[torch.Tensor],
         recv_from: Optional[int], group) -> None:
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, send_to, group))
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, recv_from, group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def _nbytes(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.numel() * x.element_size()


class _HaloExchange(torch.autograd.Function):
    """(k, v) -> (k, v, halo). Forward: send this rank's last G/2 tokens of K and V (the kv
    heads rank r+1's straddling half reads) to r+1 and receive the halo [2, G/2, b, n, d] from
    r-1, one p2p each, K and V packed together. Backward: send the halo's gradient to r-1,
    receive ours from r+1 and add it to the gradient of those tokens. k and v pass through so
    every rank's backward reaches this node, also rank 0's, which has no halo."""

    @staticmethod
    def forward(ctx, k, v, link: HaloLink):
        plan, length = link.plan, link.plan.halo_len
        _, batch, _, dim = k.shape
        send = recv = None
        if plan.send is not None:
            heads = slice(plan.send.kv_start, plan.send.kv_end)
            send = torch.stack([k[-length:, :, heads], v[-length:, :, heads]])
        if plan.recv is not None:
            recv = k.new_empty((2, length, batch, plan.recv_kv_heads, dim))
        _p2p(send, link.next_rank, recv, link.prev_rank, link.group)
        HALO_COUNTER.add(link.layer, "forward", _nbytes(recv))
        ctx.link = link
        halo = recv if recv is not None else k.new_empty((2, 0, batch, 0, dim))
        return k, v, halo

    @staticmethod
    def backward(ctx, grad_k, grad_v, grad_halo):
        link = ctx.link
        plan, length = link.plan, link.plan.halo_len
        _, batch, _, dim = grad_k.shape
        send = grad_halo.contiguous() if plan.recv is not None else None
        recv = None
        if plan.send is not None:
            recv = grad_k.new_empty((2, length, batch, plan.send_kv_heads, dim))
        _p2p(send, link.prev_rank, recv, link.next_rank, link.group)
        HALO_COUNTER.add(link.layer, "backward", _nbytes(recv))
        if recv is not None:
            heads = slice(plan.send.kv_start, plan.send.kv_end)
            grad_k, grad_v = grad_k.clone(), grad_v.clone()
            grad_k[-length:, :, heads] += recv[0]
            grad_v[-length:, :, heads] += recv[1]
        return grad_k, grad_v, None


def exchange_halo(k: torch.Tensor, v: torch.Tensor, link: HaloLink):
    """(k, v, halo) with halo = (k, v) of rank r-1's last G/2 tokens, or None; use the
    returned k and v from here on (gradients from rank r+1 enter through them)."""
    k, v, halo = _HaloExchange.apply(k, v, link)
    return k, v, (halo[0], halo[1]) if link.plan.recv is not None else None


def _neighbours(group):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    prev_rank = dist.get_global_rank(group, rank - 1) if rank > 0 else None
    next_rank = dist.get_global_rank(group, rank + 1) if rank < size - 1 else None
    return rank, size, prev_rank, next_rank


def cp_s2_attention(q, k, v, group_size: int, cp_group, *, kv_group_offset: int = 0,
                    num_kv_groups: Optional[int] = None, kernel: str = "auto",
                    softmax_scale: Optional[float] = None, layer: int = 0) -> torch.Tensor:
    """S²-Attn of this CP rank's contiguous slice (q/k/v as `s2_attention`'s, L tokens each)."""
    rank, size, prev_rank, next_rank = _neighbours(cp_group)
    local_len = q.shape[0]
    plan = halo_plan(q.shape[2], k.shape[2], group_size, local_len, rank, size,
                     kv_group_offset, num_kv_groups)
    k, v, halo = exchange_halo(k, v, HaloLink(plan, cp_group, prev_rank, next_rank, layer))
    return s2_attention_on_slice(q, k, v, group_size, rank * local_len, halo,
                                 kv_group_offset=kv_group_offset, num_kv_groups=num_kv_groups,
                                 kernel=kernel, softmax_scale=softmax_scale)


def cp_dense_attention(q, k, v, cp_group, *, softmax_scale: Optional[float] = None):
    """Dense causal attention of this CP rank's slice: K/V all-gathered over the CP group
    (megatron's sequence-parallel gather; its backward reduce-scatters), keeping the first
    (r+1)L tokens, so the bottom-right causal alignment puts query i at global rL + i."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    rank = dist.get_rank(cp_group)
    keep = (rank + 1) * q.shape[0]
    k_all, v_all = (gather_from_sequence_parallel_region(x, True, group=cp_group)[:keep]
                    for x in (k, v))
    return dense_causal_attention(q, k_all, v_all, causal=True, softmax_scale=softmax_scale)
