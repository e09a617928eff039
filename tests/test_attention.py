"""S²-Attn against the mask formulas of DESIGN.md §5 in float64; TP slicing; causality; dense
attention; errors; the megatron core-attention module."""

import itertools
import math

import pytest
import torch

from megalong.attention import (
    GroupSizeError, KernelUnavailableError, available_kernels, dense_causal_attention,
    s2_attention,
)
from megalong.attention import s2 as s2_module
from megalong.attention.groups import cu_seqlens, group_bounds, head_halves
from megalong.errors import MegalongError

# ------------------------------------------------------------------ float64 mask-formula reference


def s2_mask(seq_len, group_size, shifted):
    """[N, N] bool, True where token i may attend token j (DESIGN.md §5)."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    G = group_size
    same = (i + G // 2) // G == (j + G // 2) // G if shifted else i // G == j // G
    return (j <= i) & same


def masked_attention(q, k, v, masks, heads_per_kv):
    """float64 softmax attention; q [sq, b, h, d], k/v [sk, b, h_kv, d], masks[h] [sq, sk]."""
    q, k, v = q.double(), k.double(), v.double()
    heads = []
    for h in range(q.shape[2]):
        scores = torch.einsum("ibd,jbd->bij", q[:, :, h], k[:, :, h // heads_per_kv])
        scores = scores / math.sqrt(q.shape[-1])
        if masks[h] is not None:
            scores = scores.masked_fill(~masks[h].to(scores.device), float("-inf"))
        heads.append(torch.einsum("bij,jbd->ibd", scores.softmax(-1), v[:, :, h // heads_per_kv]))
    return torch.stack(heads, dim=2)


def pattern_masks(seq_len, group_size, heads, pattern="s2"):
    """Per-head masks of the full model. s2: global head h is shifted iff h >= nh // 2; short
    (the paper's ablation): every head in the unshifted groups."""
    return [s2_mask(seq_len, group_size, pattern == "s2" and h >= heads // 2)
            for h in range(heads)]


def reference_s2(q, k, v, group_size, pattern="s2"):
    """All heads of the full model, S²-Attn or the short pattern."""
    masks = pattern_masks(q.shape[0], group_size, q.shape[2], pattern)
    return masked_attention(q, k, v, masks, q.shape[2] // k.shape[2])


def random_qkv(seq_len, batch, heads, kv_heads, dim=8, dtype=torch.float64, seed=0,
               device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(seq_len, batch, heads, dim), (seq_len, batch, kv_heads, dim),
              (seq_len, batch, kv_heads, dim)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]


def grads(fn, inputs, weight):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    (out * weight.to(out.dtype)).sum().backward()
    return out.detach(), [x.grad for x in inputs]


# (N, G, heads, kv heads, batch)
CASES = [
    (16, 4, 4, 4, 2),    # MHA
    (32, 8, 8, 2, 1),    # GQA, kv groups split evenly between the halves
    (24, 8, 6, 3, 2),    # GQA, kv group 1 straddles nh/2 = 3
    (16, 16, 4, 1, 2),   # G = N: shifted heads are the two half groups only; MQA
    (16, 2, 2, 1, 1),    # the smallest G
    (12, 4, 3, 3, 1),    # odd head count: heads >= 3 // 2 shift (as LongLoRA)
    (40, 8, 12, 4, 2),   # GQA with 3 query heads per kv group, straddling
]


@pytest.mark.parametrize("seq_len,group_size,heads,kv_heads,batch", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_s2_matches_mask_formula(seq_len, group_size, heads, kv_heads, batch, dtype):
    qkv = random_qkv(seq_len, batch, heads, kv_heads, dtype=dtype)
    weight = torch.randn(seq_len, batch, heads, 8, dtype=torch.float64)
    out, got = grads(lambda q, k, v: s2_attention(q, k, v, group_size, kernel="sdpa"), qkv, weight)
    ref, want = grads(lambda q, k, v: reference_s2(q, k, v, group_size),
                      [x.double() for x in qkv], weight)
    assert out.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float64:
        assert (out - ref).abs().max() <= 1e-10
        for g, w in zip(got, want):
            assert (g - w).abs().max() <= 1e-8
    else:
        assert (out.double() - ref).abs().max() <= 1e-5
        for g, w in zip(got, want):
            assert (g.double() - w).abs().max() <= 1e-4 * w.abs().max()


@pytest.mark.parametrize("seq_len,group_size,heads,kv_heads,batch", CASES)
def test_short_pattern_matches_its_mask_formula(seq_len, group_size, heads, kv_heads, batch):
    """shift=False: every head in the unshifted groups (the paper's "short" ablation), forward
    and gradients, on the whole model's heads and on each tensor-parallel shard's."""
    qkv = random_qkv(seq_len, batch, heads, kv_heads)
    weight = torch.randn(seq_len, batch, heads, 8, dtype=torch.float64)
    short = lambda q, k, v: s2_attention(q, k, v, group_size, kernel="sdpa", shift=False)  # noqa: E731
    out, got = grads(short, qkv, weight)
    ref, want = grads(lambda q, k, v: reference_s2(q, k, v, group_size, "short"), qkv, weight)
    assert (out - ref).abs().max() <= 1e-10
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-8
    # It is a different function from S²-Attn wherever a group boundary matters.
    assert (out - reference_s2(*qkv, group_size)).abs().max() > 1e-3 or group_size == seq_len
    if kv_heads % 2 == 0:  # TP=2 shards: the shard's heads, none shifted
        q, k, v = qkv
        h, g = heads // 2, kv_heads // 2
        for rank in range(2):
            part = s2_attention(q[:, :, rank * h:(rank + 1) * h], k[:, :, rank * g:(rank + 1) * g],
                                v[:, :, rank * g:(rank + 1) * g], group_size, shift=False,
                                kv_group_offset=rank * g, num_kv_groups=kv_heads)
            assert (part - ref[:, :, rank * h:(rank + 1) * h]).abs().max() <= 1e-10


@pytest.mark.parametrize("heads,kv_heads,tp", [(6, 3, 3), (8, 2, 2), (8, 4, 2), (12, 4, 4)])
def test_tensor_parallel_shard_is_slice_of_full(heads, kv_heads, tp):
    """Shard r holds kv groups [r*ng/tp, (r+1)*ng/tp) and their query heads, as megatron's
    qkv split; (6, 3, 3) puts the straddling kv group 1 (heads 2, 3) alone on rank 1."""
    q, k, v = random_qkv(16, 2, heads, kv_heads)
    full = s2_attention(q, k, v, 4)
    np_local, ng_local = heads // tp, kv_heads // tp
    for rank in range(tp):
        qs, ks = slice(rank * np_local, (rank + 1) * np_local), slice(rank * ng_local, (rank + 1) * ng_local)
        part = s2_attention(q[:, :, qs], k[:, :, ks], v[:, :, ks], 4,
                            kv_group_offset=rank * ng_local, num_kv_groups=kv_heads)
        torch.testing.assert_close(part, full[:, :, qs], rtol=0, atol=1e-12)


def test_fewer_kv_groups_than_tp_ranks():
    """megatron with ng < tp: each rank holds one (replicated) kv head and nh/tp query heads;
    it is the core attention of a model with tp "virtual" kv groups."""
    q, k, v = random_qkv(16, 1, 8, 1)
    full = s2_attention(q, k, v, 8)
    for rank in range(2):
        part = s2_attention(q[:, :, 4 * rank:4 * rank + 4], k, v, 8,
                            kv_group_offset=rank, num_kv_groups=2)
        torch.testing.assert_close(part, full[:, :, 4 * rank:4 * rank + 4], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seq_len,group_size,heads,kv_heads", [(32, 8, 4, 2), (16, 16, 2, 1),
                                                              (24, 8, 6, 3)])
def test_no_future_token_reaches_an_earlier_output(seq_len, group_size, heads, kv_heads):
    """Changing tokens after t leaves every head's outputs at positions <= t bit-identical,
    including the first G/2 positions of the shifted heads (no wrap-around)."""
    q, k, v = random_qkv(seq_len, 2, heads, kv_heads, dtype=torch.float32)
    out = s2_attention(q, k, v, group_size, kernel="sdpa")
    for t in range(seq_len - 1):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[t + 1:] = torch.randn_like(x[t + 1:]) * 10
        again = s2_attention(*changed, group_size, kernel="sdpa")
        assert torch.equal(again[:t + 1], out[:t + 1]), f"position <= {t} changed"
        assert not torch.equal(again[t + 1:], out[t + 1:])


def test_group_semantics_helpers():
    assert group_bounds(16, 4, shifted=False) == [0, 4, 8, 12, 16]
    assert group_bounds(16, 4, shifted=True) == [0, 2, 6, 10, 14, 16]
    assert group_bounds(8, 8, shifted=True) == [0, 4, 8]
    assert cu_seqlens(8, 4, True, 2).tolist() == [0, 2, 6, 8, 10, 14, 16]
    unshifted, shifted = head_halves(6, 3)
    assert (unshifted.q_start, unshifted.q_end, unshifted.kv_start, unshifted.kv_end) == (0, 3, 0, 2)
    assert (shifted.q_start, shifted.q_end, shifted.kv_start, shifted.kv_end) == (3, 6, 1, 3)
    assert not unshifted.gqa_direct and unshifted.kv_of_head == (0, 0, 1)
    [only] = head_halves(4, 2, kv_group_offset=2, num_kv_groups=4)  # rank 1 of 2: all shifted
    assert only.shifted and only.gqa_direct


class LoopVarlen:
    """A CPU stand-in for a varlen kernel: SDPA per cu_seqlens segment."""

    name, layout, supports_gqa = "fake-flash", "varlen", True

    def attend_varlen(self, q, k, v, bounds, longest, scale):
        assert longest == max(b - a for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        out = torch.empty_like(q)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale,
                enable_gqa=True).transpose(0, 1)
        return out


def test_varlen_folding(monkeypatch):
    """The flash-attn path's token layout and cu_seqlens, with a CPU stand-in for the kernel."""
    monkeypatch.setattr(s2_module, "resolve_kernel", lambda *a: LoopVarlen())
    for seq_len, group_size, heads, kv_heads, batch in CASES:
        q, k, v = random_qkv(seq_len, batch, heads, kv_heads)
        for pattern in ("s2", "short"):
            torch.testing.assert_close(s2_attention(q, k, v, group_size, shift=pattern == "s2"),
                                       reference_s2(q, k, v, group_size, pattern), rtol=0,
                                       atol=1e-10)


def test_varlen_packs_both_halves_into_one_call(monkeypatch):
    """LongLoRA's layout: both head halves as 2·b sequences in one varlen call where their head
    counts match; one call per half where a kv group straddles them. Gradients as the mask."""
    calls = []

    class CountingVarlen(LoopVarlen):
        def attend_varlen(self, q, *args):
            calls.append(q.shape[1])
            return super().attend_varlen(q, *args)

    monkeypatch.setattr(s2_module, "resolve_kernel", lambda *a: CountingVarlen())
    for (seq_len, group_size, heads, kv_heads, batch), expected in (
            ((32, 8, 8, 2, 2), [4]), ((16, 16, 4, 1, 1), [2, 2]), ((24, 8, 6, 3, 2), [3, 3])):
        calls.clear()
        qkv = random_qkv(seq_len, batch, heads, kv_heads)
        weight = torch.randn(seq_len, batch, heads, 8, dtype=torch.float64)
        out, got = grads(lambda q, k, v: s2_attention(q, k, v, group_size), qkv, weight)
        ref, want = grads(lambda q, k, v: reference_s2(q, k, v, group_size), qkv, weight)
        assert calls == expected, (seq_len, heads, kv_heads, calls)
        assert (out - ref).abs().max() <= 1e-10
        for g, w in zip(got, want):
            assert (g - w).abs().max() <= 1e-10
    # Strided views, as megatron splits q, k, v out of one qkv output per kv group.
    seq_len, batch, kv_heads, per_kv, dim = 32, 2, 2, 4, 8
    qkv = torch.randn(seq_len, batch, kv_heads, (per_kv + 2) * dim, dtype=torch.float64)
    q, k, v = qkv.split([per_kv * dim, dim, dim], dim=-1)
    q = q.reshape(seq_len, batch, kv_heads * per_kv, dim)
    with torch.no_grad():
        got = s2_attention(q, k, v, 8)
    assert (got - reference_s2(q, k, v, 8)).abs().max() <= 1e-10


def _segment_sdpa(q, k, v, cu_seq_q, *, scale=None, enable_gqa=False):
    """Causal SDPA per cu_seqlens segment: a CPU stand-in for torch's varlen_attn."""
    bounds = cu_seq_q.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale,
        enable_gqa=enable_gqa).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])])


def varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                      return_aux=None):
    """torch 2.10's signature: a causal flag, no scale, no GQA."""
    assert is_causal and torch.equal(cu_seq_q, cu_seq_k)
    return _segment_sdpa(query, key, value, cu_seq_q)


def varlen_torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                      scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                      block_table=None, num_splits=None):
    """torch 2.13's signature: causal as window_size (-1, 0), scale and enable_gqa."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k)
    return _segment_sdpa(query, key, value, cu_seq_q, scale=scale, enable_gqa=enable_gqa)


def varlen_causal_only(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                       window_size=(-1, -1)):
    """A release with window_size but neither scale nor enable_gqa."""
    assert window_size == (-1, 0)
    return _segment_sdpa(query, key, value, cu_seq_q)


@pytest.mark.parametrize("varlen", [varlen_torch_2_10, varlen_torch_2_13, varlen_causal_only])
def test_torch_varlen_kernel_adapts_to_the_installed_signature(varlen, monkeypatch):
    """The torch-varlen kernel reads causal / scale / GQA support from the function's
    parameters; on each signature S²-Attn equals the mask formula (forward and gradients, GQA,
    b = 2, a kv group straddling the halves, TP shards, a non-default scale)."""
    from megalong.attention.kernels import TorchVarlenKernel

    kernel = TorchVarlenKernel(varlen_attn=varlen)
    assert kernel.supports_gqa == (varlen is varlen_torch_2_13)
    monkeypatch.setattr(s2_module, "resolve_kernel", lambda *a: kernel)
    for seq_len, group_size, heads, kv_heads, batch in CASES:
        qkv = random_qkv(seq_len, batch, heads, kv_heads)
        weight = torch.randn(seq_len, batch, heads, 8, dtype=torch.float64)
        out, got = grads(lambda q, k, v: s2_attention(q, k, v, group_size), qkv, weight)
        ref, want = grads(lambda q, k, v: reference_s2(q, k, v, group_size), qkv, weight)
        assert (out - ref).abs().max() <= 1e-10, (varlen.__name__, seq_len, heads, kv_heads)
        for g, w in zip(got, want):
            assert (g - w).abs().max() <= 1e-10
    q, k, v = random_qkv(24, 2, 6, 3)
    full = reference_s2(q, k, v, 8)
    for tp_rank in range(3):  # TP shards: one kv group each
        shard = s2_attention(q[:, :, 2 * tp_rank:2 * tp_rank + 2], k[:, :, tp_rank:tp_rank + 1],
                             v[:, :, tp_rank:tp_rank + 1], 8, kv_group_offset=tp_rank,
                             num_kv_groups=3)
        assert (shard - full[:, :, 2 * tp_rank:2 * tp_rank + 2]).abs().max() <= 1e-10
    scaled = s2_attention(q, k, v, 8, softmax_scale=0.5)
    monkeypatch.undo()
    assert (scaled - s2_attention(q, k, v, 8, kernel="sdpa", softmax_scale=0.5)).abs().max() \
        <= 1e-10


def test_flex_kernel_through_s2_attention(monkeypatch):
    """The "whole" layout: s2_attention hands the unfolded tensors and the shard's head offset
    to the kernel (eager CPU flex, forward only)."""
    from megalong.attention.flex import FlexKernel

    monkeypatch.setattr(s2_module, "resolve_kernel", lambda *a: FlexKernel())
    q, k, v = random_qkv(24, 2, 6, 3)
    full = reference_s2(q, k, v, 8)
    with torch.no_grad():
        assert (s2_attention(q, k, v, 8) - full).abs().max() <= 1e-10
        shard = s2_attention(q[:, :, 2:4], k[:, :, 1:2], v[:, :, 1:2], 8, kv_group_offset=1,
                             num_kv_groups=3)
    assert (shard - full[:, :, 2:4]).abs().max() <= 1e-10


def test_torch_varlen_kernel_refuses_an_unknown_signature():
    from megalong.attention.kernels import TorchVarlenKernel

    def no_causal_option(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        raise AssertionError("never called")

    with pytest.raises(ImportError, match="neither window_size nor is_causal"):
        TorchVarlenKernel(varlen_attn=no_causal_option)


class HostDataTensors(torch.overrides.TorchFunctionMode):
    """Records every tensor built from host (Python) data: on a GPU each is a host-to-device
    copy that synchronises the stream."""

    FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray)

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FACTORIES:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def host_data_tensors_per_call(fn, calls=2):
    """How many tensors each of `calls` calls of fn() builds from host data."""
    counts = []
    for _ in range(calls):
        with HostDataTensors() as recorder:
            fn()
        counts.append(len(recorder.calls))
    return counts


@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
def test_second_s2_call_builds_no_tensor_from_host_data(kernel, monkeypatch):
    """cu_seqlens and the K/V head index of a kv group straddling the halves are built once
    per shape and device, not per layer and step (and recompute)."""
    from megalong.attention import groups

    monkeypatch.setattr(groups, "_device_constants", {})
    if kernel == "varlen":
        monkeypatch.setattr(s2_module, "resolve_kernel", lambda *a: LoopVarlen())
    q, k, v = random_qkv(24, 2, 6, 3)  # kv group 1 serves both halves: its K/V are expanded
    first, second = host_data_tensors_per_call(lambda: s2_attention(q, k, v, 8, kernel="sdpa"))
    assert first > 0  # the recorder sees the cache being filled
    assert second == 0


# ------------------------------------------------------------------ dense attention


def reference_dense(q, k, v, causal=True, attention_mask=None):
    len_q, len_k = q.shape[0], k.shape[0]
    mask = torch.ones(len_q, len_k, dtype=torch.bool)
    if causal:
        mask = torch.arange(len_k)[None, :] <= torch.arange(len_q)[:, None] + (len_k - len_q)
    masks = [mask] * q.shape[2]
    if attention_mask is not None:  # [b, 1, sq, sk], True = masked out; one batch entry at a time
        return torch.cat([
            masked_attention(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1],
                             [m & ~attention_mask[i, 0] for m in masks], q.shape[2] // k.shape[2])
            for i in range(q.shape[1])], dim=1)
    return masked_attention(q, k, v, masks, q.shape[2] // k.shape[2])


@pytest.mark.parametrize("len_q,len_k", [(12, 12), (5, 12), (1, 12)])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_bottom_right_causal(len_q, len_k, causal):
    q, _, _ = random_qkv(len_q, 2, 4, 2, seed=1)
    _, k, v = random_qkv(len_k, 2, 4, 2, seed=2)
    got = dense_causal_attention(q, k, v, causal=causal)
    torch.testing.assert_close(got, reference_dense(q, k, v, causal), rtol=0, atol=1e-10)


def test_dense_attention_mask_and_errors():
    q, k, v = random_qkv(10, 2, 4, 2, seed=3)
    pad = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    pad[0, :, :, :3] = True  # batch 0: left padding of 3 tokens
    pad[0, :, :3, :] = False  # ... whose own rows keep something to attend to
    for causal in (True, False):
        torch.testing.assert_close(
            dense_causal_attention(q, k, v, causal=causal, attention_mask=pad),
            reference_dense(q, k, v, causal, pad), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="more queries"):
        dense_causal_attention(q, k[:5], v[:5])


# ------------------------------------------------------------------ errors and kernels


@pytest.mark.parametrize("seq_len,group_size,words", [
    (24, 16, ["seq-length 24", "group size 16", "multiple"]),
    (24, 3, ["group size 3", "even"]),
    (8, 16, ["group size 16", "seq-length 8", "between 2 and"]),
])
def test_bad_group_size_errors(seq_len, group_size, words):
    q, k, v = random_qkv(seq_len, 1, 2, 2)
    with pytest.raises(GroupSizeError) as err:
        s2_attention(q, k, v, group_size)
    assert isinstance(err.value, ValueError)
    for word in words:
        assert word in str(err.value)


def test_kernel_choice_and_absent_kernels():
    q, k, v = random_qkv(8, 1, 2, 2)
    assert "sdpa" in available_kernels()
    torch.testing.assert_close(s2_attention(q, k, v, 4, kernel="auto"),
                               s2_attention(q, k, v, 4, kernel="sdpa"), rtol=0, atol=0)
    with pytest.raises(KernelUnavailableError, match="unknown attention kernel"):
        s2_attention(q, k, v, 4, kernel="xformers")
    for name, hint in (("flash", "flash-attn"), ("te", "Transformer Engine"),
                       ("torch-varlen", "torch >= 2.10"), ("flex", "FlexAttention")):
        with pytest.raises(KernelUnavailableError) as err:
            s2_attention(q, k, v, 4, kernel=name)  # absent here, or present but CPU tensors
        assert hint in str(err.value) or "CUDA" in str(err.value)
        assert isinstance(err.value, ValueError)


# ------------------------------------------------------------------ GPU kernels (skipped on CPU)

GPU_KERNELS = [pytest.param(name, marks=pytest.mark.gpu)
               for name in ("sdpa", "torch-varlen", "flex", "flash", "te")]


@pytest.mark.parametrize("kernel", GPU_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_match_mask_formula(kernel, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if kernel not in available_kernels():
        pytest.skip(f"{kernel} does not import here")
    if kernel in ("flash", "torch-varlen") and dtype == torch.float32:
        pytest.skip(f"{kernel} is fp16/bf16 only")
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for (seq_len, group_size, heads, kv_heads, batch), pattern in itertools.product(
            CASES, ("s2", "short")):
        qkv = random_qkv(seq_len, batch, heads, kv_heads, dim=64, dtype=dtype, device="cuda")
        weight = torch.randn(seq_len, batch, heads, 64, dtype=torch.float64, device="cuda")
        out, got = grads(lambda q, k, v: s2_attention(q, k, v, group_size, kernel=kernel,
                                                      shift=pattern == "s2"), qkv, weight)
        ref, want = grads(lambda q, k, v: reference_s2(q, k, v, group_size, pattern),
                          [x.double() for x in qkv], weight)
        assert (out.double() - ref).abs().max() <= tolerance * ref.abs().max()
        for g, w in zip(got, want):
            assert (g.double() - w).abs().max() <= tolerance * w.abs().max()


# ------------------------------------------------------------------ megatron core-attention module


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
    """A 1-rank gloo group and megatron's parallel state (reused if a test already made one)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    made_dist = not dist.is_initialized()
    if made_dist:
        init_file = tmp_path_factory.mktemp("dist") / "init"
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    made_mp = not parallel_state.model_parallel_is_initialized()
    if made_mp:
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if made_mp:
        parallel_state.destroy_model_parallel()
    if made_dist:
        dist.destroy_process_group()


def make_core_attention(attention="s2", group_size=4, pg_collection=None, heads=4, kv_heads=2,
                        **patterns):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megalong.attention.core_attention import S2CoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * 8, num_attention_heads=heads,
                               num_query_groups=kv_heads, attention_dropout=0.0,
                               use_cpu_initialization=True)
    return S2CoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                           attention_type="self", cp_comm_type=None, softmax_scale=None,
                           pg_collection=pg_collection, attention=attention,
                           group_size=group_size, kernel="auto", **patterns)


def test_core_attention_eval_and_ablation_patterns(model_parallel):
    """attention "short" trains with unshifted groups; eval_attention s2/short evaluates with the
    training patterns, G fixed or a ratio of each length; a decode step stays dense."""
    from megatron.core.transformer.enums import AttnMaskType

    q, k, v = random_qkv(16, 2, 4, 2, dtype=torch.float32)
    want = {p: reference_s2(q, k, v, 4, p).flatten(2).float() for p in ("s2", "short")}
    short = make_core_attention(attention="short").train()
    torch.testing.assert_close(short(q, k, v, None), want["short"], rtol=0, atol=1e-5)
    dense = dense_causal_attention(q, k, v).flatten(2)
    torch.testing.assert_close(short.eval()(q, k, v, None), dense, rtol=0, atol=0)
    for pattern in ("s2", "short"):
        fixed = make_core_attention(attention="full", eval_attention=pattern).eval()
        torch.testing.assert_close(fixed(q, k, v, None), want[pattern], rtol=0, atol=1e-5)
        ratio = make_core_attention(attention="full", group_size=None, eval_attention=pattern,
                                    group_size_ratio=0.25).eval()
        torch.testing.assert_close(ratio(q, k, v, None), want[pattern], rtol=0, atol=1e-5)
        half = reference_s2(q[:8], k[:8], v[:8], 2, pattern).flatten(2).float()  # G = 8 / 4
        torch.testing.assert_close(ratio(q[:8], k[:8], v[:8], None), half, rtol=0, atol=1e-5)
        step = ratio(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask)
        torch.testing.assert_close(step, dense[-1:], rtol=0, atol=1e-6)
        assert (fixed.train()(q, k, v, None) - dense).abs().max() == 0  # trains dense
    with pytest.raises(MegalongError, match="eval_attention 'short' needs a group size"):
        make_core_attention(attention="full", group_size=None, eval_attention="short")
    with pytest.raises(MegalongError, match="attention must be one of"):
        make_core_attention(attention="sliding")


def test_core_attention_module_modes(model_parallel):
    from megatron.core.transformer.enums import AttnMaskType

    q, k, v = random_qkv(16, 2, 4, 2, dtype=torch.float32)
    s2_ref = s2_attention(q, k, v, 4).flatten(2)
    dense_ref = dense_causal_attention(q, k, v).flatten(2)
    module = make_core_attention()
    assert module.sharded_state_dict() == {} and not list(module.parameters())
    torch.testing.assert_close(module.train()(q, k, v, None), s2_ref, rtol=0, atol=0)
    torch.testing.assert_close(module.eval()(q, k, v, None), dense_ref, rtol=0, atol=0)
    full = make_core_attention(attention="full", group_size=None).train()
    torch.testing.assert_close(full(q, k, v, None), dense_ref, rtol=0, atol=0)

    # KV-cache decode: megatron passes no_mask past the prompt; a 3-token chunk with causal
    # type is bottom-right aligned.
    module.eval()
    step = module(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask)
    torch.testing.assert_close(step, dense_ref[-1:], rtol=0, atol=1e-6)
    chunk = module(q[-3:], k, v, None, attn_mask_type=AttnMaskType.causal)
    torch.testing.assert_close(chunk, dense_ref[-3:], rtol=0, atol=1e-6)
    pad = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    pad[1, :, 8:, :4] = True
    want = reference_dense(q, k, v, causal=False, attention_mask=pad).flatten(2).float()
    got = module(q, k, v, pad, attn_mask_type=AttnMaskType.padding)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    with pytest.raises(MegalongError, match="group size"):
        make_core_attention(group_size=None)


def test_core_attention_does_not_keep_the_qkv_output_alive(model_parallel):
    """megatron's V is a view into the qkv output; the module's graph (S² and dense) must not
    hold that whole output through the kernel's saved V, only q, k and V's own copy."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    q, k, v = random_qkv(16, 2, 4, 2, dtype=torch.float32)
    for module in (make_core_attention().train(), make_core_attention().eval()):
        # As megatron's: the output of an op (not a leaf, which its grad node would hold) with
        # V a strided view into it.
        qkv = torch.cat([v, v.clone()], dim=2).requires_grad_() * 1.0
        qkv_storage = StorageWeakRef(qkv.untyped_storage())
        value = qkv[:, :, :2]
        out = module(q, k, value, None)
        grad_fn_alive = out.grad_fn is not None
        del qkv, value
        gc.collect()
        assert grad_fn_alive and qkv_storage.expired()
        torch.testing.assert_close(out, module(q, k, v, None), rtol=0, atol=0)


def test_core_attention_reads_tensor_parallel_rank(model_parallel):
    """Rank 1 of 2 (kv groups [1, 2) of 2) computes its slice of the full model's S²-Attn."""

    class FakeGroup:
        def rank(self):
            return 1

        def size(self):
            return 2

    class Groups:
        tp = FakeGroup()

    q, k, v = random_qkv(16, 2, 4, 2, dtype=torch.float32)
    full = s2_attention(q, k, v, 4)
    module = make_core_attention(pg_collection=Groups(), heads=4, kv_heads=2).train()
    got = module(q[:, :, 2:], k[:, :, 1:], v[:, :, 1:], None)
    torch.testing.assert_close(got, full[:, :, 2:].flatten(2), rtol=0, atol=1e-6)
