"""Context-parallel S²-Attn (DESIGN.md §6): the slice math against the full-sequence function,
the halo plan and volumes, every CP layout against CP=1 on a tiny model (loss, gradients,
eval loss, logits, halo bytes), exact resume of a CP=2 training run, and flag validation."""

import math

import pytest
import torch

from megalong.attention import s2_attention
from megalong.attention.context_parallel import (
    halo_bytes, halo_plan, ring_bytes, s2_attention_on_slice,
)
from megalong.errors import MegalongError
from megalong.spawn import run_on_ranks
from megalong.config.parallel import ParallelConfig

# ------------------------------------------------------------------ the slice math (one process)


def slices_of_full(q, k, v, group_size, cp_size, tp_size=1):
    """Every (TP shard, CP slice) computed on its own, halo taken from the full K/V as rank r-1
    would send it, reassembled into the full output."""
    seq_len, heads, kv_heads = q.shape[0], q.shape[2], k.shape[2]
    local_len, np_local, ng_local = seq_len // cp_size, heads // tp_size, kv_heads // tp_size
    shards = []
    for tp_rank in range(tp_size):
        qh, kh = slice(tp_rank * np_local, (tp_rank + 1) * np_local), \
            slice(tp_rank * ng_local, (tp_rank + 1) * ng_local)
        parts = []
        for rank in range(cp_size):
            plan = halo_plan(np_local, ng_local, group_size, local_len, rank, cp_size,
                             tp_rank * ng_local, kv_heads)
            start, span = rank * local_len, slice(rank * local_len, (rank + 1) * local_len)
            halo = None
            if plan.recv is not None:
                before = slice(start - group_size // 2, start)
                heads_recv = slice(kh.start + plan.recv.kv_start, kh.start + plan.recv.kv_end)
                halo = (k[before, :, heads_recv], v[before, :, heads_recv])
            parts.append(s2_attention_on_slice(
                q[span, :, qh], k[span, :, kh], v[span, :, kh], group_size, start, halo,
                kv_group_offset=tp_rank * ng_local, num_kv_groups=kv_heads, kernel="sdpa"))
        shards.append(torch.cat(parts))
    return torch.cat(shards, dim=2)


# (N, G, heads, kv heads, batch): as test_attention's cases: kv groups split evenly, a kv group
# straddling the halves, MQA, G = N, 3 query heads per kv group.
SLICE_CASES = [(64, 16, 8, 2, 2), (48, 8, 6, 3, 1), (64, 32, 4, 4, 1), (40, 8, 12, 4, 2),
               (16, 16, 4, 1, 1), (48, 12, 8, 2, 1)]


class BottomRightVarlen:
    """A CPU stand-in for FlashAttention-2's varlen call: causal per segment, aligned
    bottom-right where a segment has fewer queries than keys."""

    name, layout, supports_gqa = "stand-in", "varlen", True

    def __init__(self):
        self.shapes = []

    def attend_varlen(self, q, k, v, cu_seqlens, max_seqlen, scale, cu_seqlens_k=None,
                      max_seqlen_k=None):
        cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        self.shapes.append((max_seqlen, max_seqlen if max_seqlen_k is None else max_seqlen_k))
        q_bounds, k_bounds = cu_seqlens.tolist(), cu_k.tolist()
        outs = []
        for a, b, c, d in zip(q_bounds[:-1], q_bounds[1:], k_bounds[:-1], k_bounds[1:]):
            mask = torch.ones(b - a, d - c, dtype=torch.bool).tril(d - c - (b - a))
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1),
                attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1))
        return torch.cat(outs)


@pytest.mark.parametrize("seq_len,group_size,heads,kv_heads,batch", SLICE_CASES)
def test_straddling_group_runs_bottom_right_through_a_varlen_kernel(
        seq_len, group_size, heads, kv_heads, batch, monkeypatch):
    """With a varlen kernel the straddling group is G/2 queries over G keys (no padded quarter),
    aligned bottom-right: slices still equal the float64 mask formula, gradients included."""
    from test_attention import reference_s2

    from megalong.attention import context_parallel, s2

    kernel = BottomRightVarlen()
    monkeypatch.setattr(s2, "resolve_kernel", lambda *a: kernel)
    monkeypatch.setattr(context_parallel, "resolve_kernel", lambda *a: kernel)
    q, k, v, weight = _inputs_and_weight(seq_len, batch, heads, kv_heads)
    want = reference_s2(q, k, v, group_size)
    want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v))
    for cp in valid_cp_sizes(seq_len, group_size)[1:]:
        for tp in [t for t in (1, 2) if kv_heads % t == 0]:
            kernel.shapes.clear()
            got = slices_of_full(q, k, v, group_size, cp, tp)
            grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
            assert (group_size // 2, group_size) in kernel.shapes, (cp, tp)
            assert (got - want).abs().max() <= 1e-10, (cp, tp)
            for g, w in zip(grads, want_grads):
                assert (g - w).abs().max() <= 1e-10, (cp, tp)


def test_second_slice_call_builds_no_tensor_from_host_data(monkeypatch):
    """A straddling kv group's K/V expansion (halo included) reuses its cached index."""
    from test_attention import host_data_tensors_per_call

    from megalong.attention import groups

    monkeypatch.setattr(groups, "_device_constants", {})
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(48, 1, h, 8, generator=gen) for h in (6, 3, 3))
    first, second = host_data_tensors_per_call(lambda: slices_of_full(q, k, v, 8, cp_size=2))
    assert first > 0 and second == 0


def _inputs_and_weight(seq_len, batch, heads, kv_heads):
    """float64 q, k, v (requiring grad) and a random output weight for gradient checks."""
    gen = torch.Generator().manual_seed(seq_len + heads)
    q, k, v = (torch.randn(seq_len, batch, h, 8, generator=gen, dtype=torch.float64,
                           requires_grad=True) for h in (heads, kv_heads, kv_heads))
    return q, k, v, torch.randn(seq_len, batch, heads, 8, generator=gen, dtype=torch.float64)


def valid_cp_sizes(seq_len, group_size):
    return [c for c in range(1, 2 * seq_len // group_size + 1)
            if seq_len % c == 0 and (seq_len // c) % (group_size // 2) == 0]


@pytest.mark.parametrize("seq_len,group_size,heads,kv_heads,batch", SLICE_CASES)
def test_slices_with_halo_equal_the_full_sequence(seq_len, group_size, heads, kv_heads, batch):
    """Outputs and q/k/v gradients (halo gradients included, as the backward exchange returns
    them) equal `s2_attention` on the whole sequence for every valid c, also on TP shards."""
    q, k, v, weight = _inputs_and_weight(seq_len, batch, heads, kv_heads)
    want = s2_attention(q, k, v, group_size)
    want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v))
    for cp in valid_cp_sizes(seq_len, group_size):
        for tp in [t for t in (1, 2, 3) if kv_heads % t == 0]:
            got = slices_of_full(q, k, v, group_size, cp, tp)
            grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
            assert (got - want).abs().max() <= 1e-12, (cp, tp)
            for g, w in zip(grads, want_grads):
                assert (g - w).abs().max() <= 1e-12, (cp, tp)


def test_halo_plan_follows_the_slice_boundaries():
    # N = 64, G = 16, 8 heads over 2 kv groups: kv group 0 unshifted, kv group 1 shifted.
    def plan(rank, cp, tp_rank=0, tp=1):
        return halo_plan(8 // tp, 2 // tp, 16, 64 // cp, rank, cp, tp_rank * 2 // tp, 2)

    assert plan(0, 2).recv is None and plan(0, 2).send.shifted  # L % G == 0: the shifted half
    assert plan(1, 2).recv.shifted and plan(1, 2).send is None
    # L = G/2 (c = 8): rank starts alternate between the two halves' boundaries.
    assert [plan(r, 8).recv.shifted for r in range(1, 8)] == [False, True] * 3 + [False]
    assert [plan(r, 8).send.shifted for r in range(7)] == [False, True] * 3 + [False]
    assert plan(3, 8).recv_kv_heads == 1 and plan(3, 8).halo_len == 8
    # TP=2: shard 0 holds only unshifted heads, so at L % G == 0 it exchanges nothing.
    assert plan(1, 4, tp_rank=0, tp=2).recv is None and plan(1, 4, tp_rank=1, tp=2).recv


@pytest.mark.parametrize("seq_len,group_size,cp", [(32768, 8192, 2), (32768, 8192, 4),
                                                   (100352, 25088, 2), (4096, 512, 8)])
def test_halo_over_ring_volume_is_gc_over_4n_c_minus_1(seq_len, group_size, cp):
    """With L % G == 0 and the kv heads split evenly between the halves (ng even)."""
    kv_heads, dim, batch, size = 8, 128, 1, 2
    ratio = halo_bytes(group_size, kv_heads // 2, dim, batch, size) / \
        ring_bytes(seq_len, cp, kv_heads, dim, batch, size)
    assert math.isclose(ratio, group_size * cp / (4 * seq_len * (cp - 1)), rel_tol=1e-15)


def test_cp_validation_accepts_up_to_2n_over_g_and_suggests_working_sizes():
    from megalong.config.model import validate_context_parallel

    for cp in (1, 2, 4, 8):  # N = 8192, G = 2048: L = 4096 ... 1024 = G/2
        validate_context_parallel(8192, cp, 2048)
    validate_context_parallel(96, 3, None)  # dense attention: any c dividing N
    with pytest.raises(MegalongError, match=r"use --context-parallel-size in \{2, 4, 8\}, or keep "
                                            r"c = 16 with --group-size in \{1024, 512, 256\}"):
        validate_context_parallel(8192, 16, 2048)
    for group_size in (1024, 512, 256):
        validate_context_parallel(8192, 16, group_size)
    with pytest.raises(MegalongError, match="divisible by tensor-model-parallel-size 4"):
        validate_context_parallel(96, 16, 12, tp=4, sequence_parallel=True)  # L = 6


# ------------------------------------------------------------------ layouts on gloo ranks

SEQ, MICRO_BATCH, MICRO_BATCHES = 64, 2, 2


def _batches():
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(MICRO_BATCHES):
        ids = torch.randint(0, 1001, (MICRO_BATCH, SEQ + 1), generator=gen)
        loss_mask = (torch.rand(MICRO_BATCH, SEQ, generator=gen) > 0.2).float()
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": loss_mask})
    return out


def _reduced(outputs, group):
    """Mean token loss and token count summed over DP x CP, per DP replica (all replicas
    train on the same micro-batches here)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    total = torch.tensor([sum(float(o["loss_sum"]) for o in outputs),
                          sum(float(o["num_tokens"]) for o in outputs)], dtype=torch.float64)
    dist.all_reduce(total, group=group)
    return (total[0] / total[1]).item(), total[1].item() / \
        parallel_state.get_data_parallel_world_size()


def run_layouts(ckpt, layouts):
    """On every rank, per (tp, cp, G, recompute: None or "full"): loss, trainable gradients
    (after megatron DDP
    and finalize_model_grads), eval loss and logits; gradients only from the first rank of each
    TP shard's DP x CP group (they are all-reduced there), halo bytes from every rank."""
    from megatron.core import parallel_state

    from megalong import runtime
    from megalong.attention.context_parallel import HALO_COUNTER
    from megalong.checkpoint import load_checkpoint
    from megalong.config.checkpoint import read_metadata
    from megalong.config.job import JobConfig
    from megalong.model.forward import run_microbatches
    from model_logits import full_logits
    from megalong.model.llama import ModelOptions, build_llama
    from megalong.training.setup import wrap_data_parallel

    meta = read_metadata(ckpt)
    results = []
    for tp, cp, group_size, recompute in layouts:
        runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp))
        model = build_llama(meta.arch, ModelOptions(
            seq_length=SEQ, padded_vocab_size=meta.padded_vocab_size, group_size=group_size,
            interpolation_factor=meta.interpolation_factor, initialize=False,
            recompute_granularity=recompute))
        load_checkpoint([model], ckpt)
        ddp = wrap_data_parallel([model], JobConfig())
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        HALO_COUNTER.reset()
        loss = _reduced(run_microbatches(ddp, _batches(), forward_only=False), dp_cp)
        halo = {"received": HALO_COUNTER.per_layer(),
                "layers": sorted(HALO_COUNTER.received)}
        grads = None
        if dist_rank(dp_cp) == 0:
            grads = {name: p.main_grad.detach().clone() for name, p in model.named_parameters()
                     if p.requires_grad}
        model.eval()
        with torch.no_grad():
            eval_loss = _reduced(run_microbatches(ddp, _batches(), forward_only=True), dp_cp)
            logits = full_logits(model, _batches()[0]["tokens"])
        results.append({
            "loss": loss, "eval_loss": eval_loss, "grads": grads, "halo": halo,
            "logits": logits if dist_rank(dp_cp) == 0 else None,
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "cp_rank": parallel_state.get_context_parallel_rank(),
            "heads_local": model.config.num_attention_heads // tp,
            "kv_heads_local": model.config.num_query_groups // tp,
            "head_dim": model.config.kv_channels})
    return results


def dist_rank(group):
    import torch.distributed as dist

    return dist.get_rank(group)


def rel_err(got, want):
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def expected_halo(result, layout, num_kv_heads):
    """G/2 x (kv heads of the straddling half on this rank) x d x 2 x micro-batch x 4 bytes."""
    tp, cp, group_size, _ = layout
    ng_local = result["kv_heads_local"]
    plan = halo_plan(result["heads_local"], ng_local, group_size, SEQ // cp, result["cp_rank"],
                     cp, result["tp_rank"] * ng_local, num_kv_heads)
    return halo_bytes(group_size, plan.recv_kv_heads, result["head_dim"], MICRO_BATCH, 4)


@pytest.mark.slow
def test_cp_layouts_equal_cp1(tiny_megatron_ckpt):
    """CP = 2, 4, 8 (L = G/2) and TP=2 x CP=2, TP=2 x CP=4 (L = G/2, TP shards holding one
    half each) on 8 gloo ranks: loss, gradients, eval loss (dense, all-gathered K/V) and
    logits equal CP=1's within 1e-5; forward halo bytes as DESIGN.md §6; recompute repeats
    the forward exchange only."""
    g16, g32 = 16, 32
    references = [(1, 1, g16, None), (2, 1, g16, None), (2, 1, g32, None)]
    layouts = [(1, 2, g16, None), (1, 4, g16, None), (1, 8, g16, None), (2, 2, g16, None),
               (2, 4, g32, None), (1, 4, g16, "full"), (2, 2, g16, "full")]
    per_rank = run_on_ranks(run_layouts, 8, tiny_megatron_ckpt, references + layouts,
                            timeout_s=200)
    by_layout = list(zip(*per_rank))  # [layout][rank]
    ref_of = {(tp, g): by_layout[i] for i, (tp, _, g, _) in enumerate(references)}
    assert all(r["halo"]["received"] == {"forward": 0, "backward": 0}
               for ranks in by_layout[:len(references)] for r in ranks)
    for index, layout in enumerate(layouts, start=len(references)):
        tp, cp, group_size, recompute = layout
        repeats = 2 if recompute == "full" else 1  # the recompute repeats the forward exchange
        ranks, reference = by_layout[index], ref_of[(tp, group_size)]
        ref0 = reference[0]
        for r in ranks:
            assert math.isclose(r["loss"][0], ref0["loss"][0], rel_tol=1e-5), (layout, r["loss"])
            assert r["loss"][1] == ref0["loss"][1]  # token counts summed over CP
            assert math.isclose(r["eval_loss"][0], ref0["eval_loss"][0], rel_tol=1e-5), layout
        for r in ranks:
            if r["grads"] is None:
                continue
            want = next(x for x in reference if x["grads"] and x["tp_rank"] == r["tp_rank"])
            assert r["grads"].keys() == want["grads"].keys()
            for name, grad in r["grads"].items():
                assert rel_err(grad, want["grads"][name]) <= 1e-5, (layout, name)
            torch.testing.assert_close(r["logits"], want["logits"], rtol=1e-5, atol=1e-5)
        for r in ranks:
            forward = expected_halo(r, layout, num_kv_heads=2) * MICRO_BATCHES
            counted = r["halo"]["received"]
            assert counted["forward"] == forward * repeats, (layout, r["cp_rank"])
            assert r["halo"]["layers"] in ([], [1, 2])
        # Backward returns what the forward brought: rank r+1's receipt is rank r's backward.
        received = {(r["tp_rank"], r["cp_rank"]): r["halo"]["received"] for r in ranks}
        for (tp_rank, cp_rank), counted in received.items():
            after = received.get((tp_rank, cp_rank + 1), {"forward": 0})["forward"]
            assert counted["backward"] == after // repeats, (layout, cp_rank)
        assert any(r["halo"]["received"]["forward"] for r in ranks)


# ------------------------------------------------------------------ the trainer under CP


def train_and_log(argv_list):
    """On every rank: train once per argv; (losses, this rank's stderr) of each."""
    import contextlib
    import io

    from megalong.cli.train import main

    runs = []
    for argv in argv_list:
        log = io.StringIO()
        with contextlib.redirect_stderr(log):
            losses = main(argv)
        runs.append((losses, log.getvalue()))
    return runs


@pytest.mark.slow
def test_cp2_training_matches_dp2_resumes_exactly_and_logs_halo(tiny_megatron_ckpt, corpus,
                                                                sp_model, tmp_path):
    """2 ranks, LoRA+ and S²-Attn (G = 16, L = 32): CP=2 trains to the losses of DP=2 (the
    single-rank ones, test_training), an interrupted CP=2 run resumes bit for bit, and the log
    reports the halo bytes per layer of each step."""
    from test_training import rel_close, train_args

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    base = train_args(tiny_megatron_ckpt, corpus, sp_model, iters=4)
    cp2 = base + ["--context-parallel-size", "2"]
    runs = run_on_ranks(train_and_log, 2, [
        base,
        cp2 + ["--save", full],
        cp2 + ["--save", part, "--save-interval", "2", "--exit-interval", "2"],
        train_args(part, corpus, sp_model, "--context-parallel-size", "2", "--save", part,
                   iters=4),
    ])
    (dp2, _), (uninterrupted, log), (first, _), (resumed, _) = runs[1]  # the logging rank
    assert rel_close(uninterrupted, dp2), (uninterrupted, dp2)
    assert first == uninterrupted[:2]
    assert resumed == uninterrupted[2:], "resume must be bit for bit"
    # 4 micro-batches of 1 per step; G/2 = 8 tokens, 1 kv head of 8 dims, K and V, float32.
    step_bytes = 4 * halo_bytes(16, 1, 8, 1, 4)
    kib = f"{step_bytes / 1024:.1f} KiB"
    assert f"halo/layer fwd {kib} bwd {kib}" in log, log[-2000:]
