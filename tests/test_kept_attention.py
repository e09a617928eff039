"""Attention kept through full recompute (attention/kept_outputs.py): the same loss and
gradients as no recompute and as plain full recompute, with the attention kernel run once per
layer instead of twice; entries no recompute claims are dropped, not misused. Pipeline and
context parallel runs with it are in test_training and test_context_parallel."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megalong.attention import kernels
from megalong.attention.kept_outputs import KeptAttentionOutputs
from megalong.attention.s2 import s2_attention
from megalong.spawn import run_on_ranks
from test_model import VOCAB


class _CountingSDPA(kernels.SDPAKernel):
    calls = 0

    def attend(self, q, k, v, scale):
        type(self).calls += 1
        return super().attend(q, k, v, scale)


def _layer(weights, x, kept):
    """x [s, b, 16] -> S²-Attn (4 heads, 2 kv heads, G = s/4) -> out projection."""
    wq, wk, wv, wo = weights
    s, b = x.shape[:2]
    q, k, v = (x @ wq).view(s, b, 4, 4), (x @ wk).view(s, b, 2, 4), (x @ wv).view(s, b, 2, 4)

    def attend(q, k, v):
        return s2_attention(q, k, v, s // 4, kernel="sdpa")

    out = kept(attend, q, k, v) if kept is not None else attend(q, k, v)
    return torch.tanh(out.reshape(s, b, 16) @ wo)


def _loss_and_grads(mode, x, weights, kept=None):
    weights = [w.clone().requires_grad_() for w in weights]
    x = x.clone().requires_grad_()
    h = x
    for layer in range(2):
        if mode == "none":
            h = _layer(weights, h, None)
        else:
            h = checkpoint(_layer, weights, h, kept[layer] if kept else None, use_reentrant=True)
    loss = h.pow(2).mean()
    loss.backward()
    return loss.detach(), [x.grad, *(w.grad for w in weights)]


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float64),
    # On GPUs: does the recompute reproduce q, k and v closely enough to claim its entries?
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
])
def test_checkpointed_layers_reuse_the_kept_output(monkeypatch, device, dtype):
    """Reentrant checkpointing (megatron's kind: the first forward runs without a graph)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    counting = _CountingSDPA()
    monkeypatch.setitem(kernels._instances, "sdpa", counting)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 16, generator=gen, dtype=torch.float64).to(device, dtype)
    weights = [(0.5 * torch.randn(16, n, generator=gen, dtype=torch.float64)).to(device, dtype)
               for n in (16, 8, 8, 16)]
    calls = {}
    results = {}
    for mode in ("none", "recompute", "keep"):
        kept = [KeptAttentionOutputs(), KeptAttentionOutputs()] if mode == "keep" else None
        _CountingSDPA.calls = 0
        results[mode] = _loss_and_grads(mode, x, weights, kept)
        calls[mode] = _CountingSDPA.calls
        if kept:
            assert [len(k) for k in kept] == [0, 0] and [k.dropped for k in kept] == [0, 0]
    assert calls["recompute"] == 2 * calls["none"] and calls["keep"] == calls["none"] > 0
    exact = dtype == torch.float64  # GPU kernels may pick other algorithms without a graph
    for mode in ("recompute", "keep"):
        torch.testing.assert_close(results[mode][0], results["none"][0], rtol=0 if exact else 1e-2,
                                   atol=0 if exact else 1e-3)
        for got, want in zip(results[mode][1], results["none"][1]):
            torch.testing.assert_close(got, want, rtol=1e-12 if exact else 2e-2,
                                       atol=1e-14 if exact else 2e-2 * want.abs().max().item())


def test_unclaimed_entries_are_dropped_and_the_attention_runs_again():
    """A forward without a graph that no backward follows (e.g. a no-grad check in training
    mode) leaves an entry; the next recompute does not match it, drops it and computes."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(16, 1, 2, 4, generator=gen) for _ in range(3))
    kept = KeptAttentionOutputs()

    def attend(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(0, 2) for t in (q, k, v)),
                                              is_causal=True).transpose(0, 2)

    with torch.no_grad():
        kept(attend, q + 1, k, v)  # stale: other inputs
        kept(attend, q, k, v)
    assert len(kept) == 2
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kept(attend, *leaves)
    assert len(kept) == 0 and kept.dropped == 1
    out.square().sum().backward()
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    attend(*refs).square().sum().backward()
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad)
    # Nothing kept: computes as usual, with a graph.
    again = kept(attend, *leaves)
    assert again.grad_fn is not None and kept.dropped == 1
    # A recompute that rounds differently from its forward (every element 1 ulp away here)
    # still claims its entry: the kept output, the forward's own, comes back.
    with torch.no_grad():
        forward = kept(attend, q, k, v)
    nudged = [torch.nextafter(t, t + 1).requires_grad_() for t in (q, k, v)]
    reused = kept(attend, *nudged)
    assert len(kept) == 0 and kept.dropped == 1 and torch.equal(reused, forward)
    reused.square().sum().backward()
    for got, want in zip(nudged, refs):
        torch.testing.assert_close(got.grad, want.grad)


def test_an_entry_holds_only_what_the_kernel_saves():
    """The kept graph does not hold q, k, v itself: with a kernel that copies its inputs (as
    GPU SDPA and Transformer Engine do) they are freed after the first forward, with one that
    saves views of them (CPU SDPA) they live on; either way the recompute claims its entry."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(16, 1, 2, 4, generator=gen) for _ in range(3))

    def saving_views(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(0, 2) for t in (q, k, v)),
                                              is_causal=True).transpose(0, 2)

    def copying(q, k, v):
        return saving_views(*(t.transpose(0, 2).contiguous().transpose(0, 2) for t in (q, k, v)))

    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    saving_views(*refs).square().sum().backward()
    for attend, freed in ((copying, True), (saving_views, False)):
        kept = KeptAttentionOutputs()
        inputs = [t.clone() for t in (q, k, v)]
        storages = [StorageWeakRef(t.untyped_storage()) for t in inputs]
        with torch.no_grad():
            kept(attend, *inputs)
        del inputs
        gc.collect()
        assert [ref.expired() for ref in storages] == [freed] * 3, attend.__name__
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        kept(attend, *leaves).square().sum().backward()
        assert len(kept) == 0 and kept.dropped == 0
        for got, want in zip(leaves, refs):
            torch.testing.assert_close(got.grad, want.grad)


def model_loss_grads_and_kernel_calls(hf_dir, tokens, layouts):
    """The megatron model (S²-Attn) per (tp, pp, recompute), one micro-batch per sample: loss
    (last stage), this rank's gradients (TP-gathered), SDPA calls in one forward + backward, and
    what the kept entries did."""
    from megalong import runtime
    from megalong.attention.kept_outputs import KeptAttentionOutputs, clear_kept_attention
    from megalong.convert.hf_checkpoint import HFCheckpointReader
    from megalong.convert.hf_config import arch_from_hf_config
    from megalong.convert.layouts import padded_vocab_size
    from megalong.convert.model_io import load_hf_weights
    from megalong.model.forward import run_microbatches
    from megalong.model.llama import ModelOptions, build_llama
    from test_s2_model import _full_grad

    counting = _CountingSDPA()
    kernels._instances["sdpa"] = counting
    seq = tokens.shape[1] - 1
    batches = [_batch(tokens[i:i + 1], seq) for i in range(tokens.shape[0])]
    results = []
    for tp, pp, recompute in layouts:
        runtime.init_distributed(runtime.ParallelSizes(tensor=tp, pipeline=pp))
        reader = HFCheckpointReader(hf_dir)
        arch, _ = arch_from_hf_config(reader.config, hf_dir)
        padded = padded_vocab_size(arch.vocab_size, 128, tp)
        model = build_llama(arch, ModelOptions(
            seq_length=seq, padded_vocab_size=padded, attention="s2", group_size=seq // 4,
            initialize=False, attention_kernel="sdpa",
            recompute_granularity="full" if recompute != "none" else None,
            recompute_method="block" if recompute == "block keep" else "uniform",
            recompute_num_layers=2 if recompute == "2-layer keep" else 1,
            recompute_keep_attention=recompute.endswith("keep")))
        load_hf_weights(model, reader.get, arch, padded)
        model.train()
        kept = [m.kept_outputs for m in model.modules()
                if isinstance(getattr(m, "kept_outputs", None), KeptAttentionOutputs)]
        assert len(kept) == (len(model.decoder.layers) if recompute.endswith("keep") else 0)
        stale_batch = [_batch(tokens[:1] + 1, seq)]
        with torch.no_grad():  # a stale entry per layer, which the step must not use
            run_microbatches(model, stale_batch, forward_only=True)
        stale = [len(k) for k in kept]
        clear_kept_attention([model])
        cleared = [len(k) for k in kept]
        with torch.no_grad():
            run_microbatches(model, stale_batch, forward_only=True)
        _CountingSDPA.calls = 0
        outputs = run_microbatches(model, batches, forward_only=False)
        grads = {n: _full_grad(n, p, tp) for n, p in model.named_parameters() if p.requires_grad}
        results.append({"loss": sum(float(o["loss_sum"]) for o in outputs) if outputs else None,
                        "grads": grads, "calls": _CountingSDPA.calls, "stale": stale,
                        "cleared": cleared, "left": [len(k) for k in kept],
                        "dropped": [k.dropped for k in kept]})
    return results


def _batch(tokens, seq):
    tokens = tokens % VOCAB
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "loss_mask": torch.ones(tokens.shape[0], seq)}


def _assert_same(result, want, where):
    if want["loss"] is not None:
        assert abs(result["loss"] - want["loss"]) <= 1e-6 * abs(want["loss"]), where
    assert result["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert (result["grads"][name] - grad).abs().max() <= 1e-5 * scale, (where, name)


@pytest.mark.slow
def test_model_with_kept_attention_equals_no_recompute_at_tp_and_pp(tiny_hf_dir):
    """TP=1 and TP=2 against no recompute; also both layers in one checkpoint (the second
    layer's recomputed inputs come from the first's kept output) and block recompute of the
    first layer (the second keeps its activations and runs attention once, with a graph).
    PP=2 (4 micro-batches in flight through 1F1B, so each layer holds several kept entries at
    once) against PP=2 with plain full recompute."""
    tokens = torch.randint(0, VOCAB, (4, 65), generator=torch.Generator().manual_seed(6))
    layouts = [(1, 1, "none"), (1, 1, "full"), (1, 1, "keep"), (2, 1, "keep"),
               (1, 1, "2-layer keep"), (1, 1, "block keep"), (1, 2, "full"), (1, 2, "keep")]
    per_rank = run_on_ranks(model_loss_grads_and_kernel_calls, 2, tiny_hf_dir, tokens, layouts)
    for rank, results in enumerate(per_rank):
        by = dict(zip(layouts, results))
        none = by[(1, 1, "none")]
        for layout in (layout for layout in layouts if layout[2].endswith("keep")):
            keep = by[layout]
            layers = 2 if layout[1] == 1 else 1
            # The model's no-grad forward in training mode left one entry per layer; the step
            # dropped it, claimed its own and left nothing behind.
            assert keep["stale"] == [1] * layers and keep["cleared"] == [0] * layers, layout
            assert keep["left"] == [0] * layers and keep["dropped"] == [1] * layers, layout
        assert by[(1, 1, "full")]["calls"] == 2 * none["calls"] > 0
        tp1 = [(1, 1, "keep"), (1, 1, "2-layer keep"), (1, 1, "block keep")]
        assert all(by[layout]["calls"] == none["calls"] for layout in tp1)  # TP=2: half the heads
        assert by[(1, 2, "full")]["calls"] == 2 * by[(1, 2, "keep")]["calls"] > 0
        for layout in [(1, 1, "full"), (2, 1, "keep")] + tp1:
            _assert_same(by[layout], none, (rank, layout))
        _assert_same(by[(1, 2, "keep")], by[(1, 2, "full")], (rank, "pp2"))
        if rank == 1:  # the last stage's loss is the whole model's
            assert abs(by[(1, 2, "keep")]["loss"] - none["loss"]) <= 1e-6 * abs(none["loss"])
