"""LoRA in tensor-parallel linears (DESIGN.md §7): the merge math, flags, and — on 2 gloo ranks —
TP=2 with and without sequence parallel against TP=1 (outputs, A/B/embedding/norm gradients),
merge at TP=1 and TP=2, frozen parameters, dropout masks, and dist checkpoints across TP sizes.
Every check randomises A and B first: at init B = 0, and a broken adapter would pass."""

import argparse

import pytest
import torch

from megalong.convert.layouts import fc1_shard, qkv_hf_to_megatron, qkv_megatron_to_hf, tp_shard
from megalong.errors import MegalongError
from layout_inverses import fuse_parts_last_dim
from megalong.lora.merge import column_delta, fuse_parts, row_delta
from megalong.spawn import run_on_ranks
from megalong.config.parallel import ParallelConfig

VOCAB = 1001
ALL_PARTS = ("q", "k", "v", "o", "gate", "up", "down")


# ------------------------------------------------------------------------------ pure math


def test_column_merge_is_local_per_shard_and_matches_hf_parts():
    """Fused qkv: merging each TP shard with its own B rows equals merging HF's q/k/v and then
    fusing and sharding — no communication needed, and k's B untouched when k is not adapted."""
    gen = torch.Generator().manual_seed(0)
    nh, ng, d, hidden, r, scale, tp = 8, 2, 4, 16, 3, 1.5, 2
    rows = {"q": nh * d, "k": ng * d, "v": ng * d}
    w = {p: torch.randn(n, hidden, generator=gen, dtype=torch.float64) for p, n in rows.items()}
    a = {p: torch.randn(r, hidden, generator=gen, dtype=torch.float64) for p in ("q", "v")}
    b = {p: torch.randn(rows[p], r, generator=gen, dtype=torch.float64) for p in ("q", "v")}
    merged_hf = {p: w[p] + (scale * b[p] @ a[p] if p in a else 0) for p in rows}
    merged_full = qkv_hf_to_megatron(merged_hf["q"], merged_hf["k"], merged_hf["v"], nh, ng)
    fused = qkv_hf_to_megatron(w["q"], w["k"], w["v"], nh, ng)
    for rank in range(tp):
        local_rows = {p: n // tp for p, n in rows.items()}
        b_shard = {p: tp_shard(b[p], 0, rank, tp) for p in b}
        delta = column_delta("qkv", a, b_shard, scale, local_rows, num_heads=nh // tp,
                             num_kv_heads=ng // tp).double()
        assert torch.allclose(tp_shard(fused, 0, rank, tp) + delta, tp_shard(merged_full, 0, rank, tp))
    q, k, v = qkv_megatron_to_hf(merged_full, nh, ng)
    assert torch.equal(k, w["k"]) and not torch.allclose(q, w["q"])


def test_fc1_and_row_merges_and_activation_layout():
    gen = torch.Generator().manual_seed(1)
    hidden, ffn, r, scale, tp = 12, 10, 2, 2.0, 2
    gate, up = torch.randn(ffn, hidden, generator=gen), torch.randn(ffn, hidden, generator=gen)
    a = {p: torch.randn(r, hidden, generator=gen) for p in ("gate", "up")}
    b = {p: torch.randn(ffn, r, generator=gen) for p in ("gate", "up")}
    for rank in range(tp):
        delta = column_delta("fc1", a, {p: tp_shard(b[p], 0, rank, tp) for p in b}, scale,
                             {"gate": ffn // tp, "up": ffn // tp})
        expected = fc1_shard(gate + scale * b["gate"] @ a["gate"], up + scale * b["up"] @ a["up"],
                             rank, tp)
        assert torch.allclose(fc1_shard(gate, up, rank, tp) + delta, expected, atol=1e-5)
    # Row: the per-rank deltas are the column blocks of the full delta.
    down_a, down_b = torch.randn(r, ffn, generator=gen), torch.randn(hidden, r, generator=gen)
    blocks = [row_delta(tp_shard(down_a, 1, rank, tp), down_b, scale) for rank in range(tp)]
    assert torch.allclose(torch.cat(blocks, 1), row_delta(down_a, down_b, scale), atol=1e-5)
    # Activations [s, b, rows] are laid out exactly as weight rows.
    outputs = {"q": torch.randn(3, 2, 8, generator=gen), "v": torch.randn(3, 2, 4, generator=gen)}
    rows = {"q": 8, "k": 4, "v": 4}
    by_rows = fuse_parts("qkv", {p: t.permute(2, 0, 1) for p, t in outputs.items()}, rows,
                         num_heads=2, num_kv_heads=1)
    assert torch.equal(fuse_parts_last_dim("qkv", outputs, rows, num_heads=2, num_kv_heads=1),
                       by_rows.permute(1, 2, 0))


def test_lora_flags_validate_with_clear_errors():
    from megalong.config.lora import LoraConfig
    from megalong.config.lora import parts_for_targets

    parser = argparse.ArgumentParser()
    LoraConfig.add_args(parser)

    def lora(argv):
        config = LoraConfig.from_args(parser.parse_args(argv))
        config.validate()
        return config

    config = lora([])
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (8, 16.0, 0.0)
    assert config.lora_targets == ("q", "k", "v", "o")
    assert config.trainable_params == ("embed", "norm")
    assert parts_for_targets(["fc2", "q", "fc1"]) == ("q", "gate", "up", "down")
    assert lora(["--trainable-params", "none"]).trainable_params == ()
    bad = [
        (["--lora-targets", "q,gate_proj,x"], "gate_proj, x; valid: q,k,v,o,fc1,fc2"),
        (["--trainable-params", "embed,lm_head"], "lm_head; valid: embed,norm or none"),
        (["--lora-rank", "0"], "--lora-rank"),
        (["--lora-dropout", "1"], "--lora-dropout"),
        (["--lora-b-lr-ratio", "-2"], "--lora-b-lr-ratio"),
    ]
    for argv, fragment in bad:
        with pytest.raises(MegalongError, match=fragment.replace("(", r"\(")):
            lora(argv)
    with pytest.raises(MegalongError, match="unknown LoRA target"):
        parts_for_targets(["qkv"])


# ------------------------------------------------------------------------------ on 2 ranks


def _build(hf_dir, tokens, tp, sp, pp=1):
    from megalong import runtime
    from megalong.convert.hf_checkpoint import HFCheckpointReader
    from megalong.convert.model_io import load_hf_weights
    from megalong.model.llama import ModelOptions, build_llama

    runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    reader = HFCheckpointReader(hf_dir)
    arch, _ = reader.arch()
    opts = ModelOptions(seq_length=tokens.shape[1], padded_vocab_size=1024, attention="full",
                        sequence_parallel=sp, initialize=False)
    model = build_llama(arch, opts)
    load_hf_weights(model, reader.get, arch, 1024)
    return model, arch


def _gathered(tensor, param):
    """The full tensor of a TP-split parameter (or its gradient); replicated ones as they are."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    pieces = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(pieces, tensor.detach().contiguous(),
                    group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, param.partition_dim)


def _train_step(ddp, tokens):
    from megatron.core.distributed import finalize_model_grads

    from megalong.model.forward import run_microbatches

    labels = torch.roll(tokens, -1, 1)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens, dtype=torch.float)}
    ddp.zero_grad_buffer()
    outputs = run_microbatches([ddp], [batch], forward_only=False)
    num_tokens = torch.tensor(sum(int(o["num_tokens"]) for o in outputs))
    finalize_model_grads([ddp], num_tokens=num_tokens)  # per-token mean, SP-tagged sums over TP


def tp_layout_checks(hf_dir, tokens, checkpoint_root):
    """Per layout (tp, sp): logits without/with adapters and merged, trainable params and their
    gradients (gathered), frozen-gradient check; plus dropout and checkpoint round trips."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megalong.checkpoint import load_checkpoint, save_checkpoint
    from megalong.config.checkpoint import CheckpointMetadata
    from megalong.lora.apply import (LoraOptions, add_lora, describe_trainable, init_lora,
                                     iter_adapters, merge_lora, set_trainable)
    from model_logits import full_logits

    options = LoraOptions(rank=4, alpha=12.0, parts=ALL_PARTS)
    results = {}
    for tp, sp in [(2, False), (2, True), (1, False)]:
        model, arch = _build(hf_dir, tokens, tp, sp)
        model.eval()
        base = full_logits(model, tokens)
        add_lora(model, options)
        follows_eval = not any(adapter.training for *_, adapter in iter_adapters(model))
        init_lora(model, seed=11, b_std=0.3)  # A and B random, identically at every layout
        set_trainable(model, ("embed", "norm"))
        summary = describe_trainable(model)
        lora = full_logits(model, tokens)
        if (tp, sp) == (2, False):
            metadata = CheckpointMetadata(arch=arch, padded_vocab_size=1024,
                                          seq_length=tokens.shape[1], lora=options.to_metadata())
            save_checkpoint([model], checkpoint_root, iteration=3, metadata=metadata)
        model.train()
        ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        _train_step(ddp, tokens)
        params = dict(model.named_parameters())
        trainable = sorted(n for n, p in params.items() if p.requires_grad)  # same order on all ranks
        grads = {n: _gathered(params[n].main_grad, params[n]) for n in trainable}
        values = {n: _gathered(params[n], params[n]) for n in trainable if "_lora." in n}
        frozen_grads = [n for n, p in params.items() if not p.requires_grad and
                        (p.grad is not None or getattr(p, "main_grad", None) is not None)]
        dropout_grads = None
        if (tp, sp) == (2, False):  # replicated x: the same dropout mask on every TP rank
            for _, _, _, adapter in iter_adapters(model):
                adapter.dropout = 0.5
            _train_step(ddp, tokens)
            dropout_grads = {n: params[n].main_grad.clone() for n in trainable
                             if "linear_qkv_lora" in n and n.endswith(".A")}
            for _, _, _, adapter in iter_adapters(model):
                adapter.dropout = 0.0
        model.eval()
        merge_lora(model)
        merged = full_logits(model, tokens)
        results[(tp, sp)] = dict(base=base, lora=lora, merged=merged, grads=grads, values=values,
                                 trainable=trainable, frozen_grads=frozen_grads,
                                 dropout_grads=dropout_grads, summary=summary,
                                 follows_eval=follows_eval,
                                 sp_tagged=sorted(n for n in trainable
                                                  if getattr(params[n], "sequence_parallel", False)))
    # PP=2: each stage's adapters are initialised by global layer, so the function is the same.
    model, _ = _build(hf_dir, tokens, 1, False, pp=2)
    model.eval()
    add_lora(model, options)
    init_lora(model, seed=11, b_std=0.3)
    results["pp2"] = full_logits(model, tokens)
    merge_lora(model)
    results["pp2_merged"] = full_logits(model, tokens)
    # A checkpoint written at TP=2 loads at TP=1 into adapters initialised differently.
    model, _ = _build(hf_dir, tokens, 1, False)
    add_lora(model, LoraOptions(rank=4, alpha=12.0, parts=ALL_PARTS, init_seed=99))
    load_checkpoint([model], checkpoint_root)
    model.eval()
    results["reloaded"] = full_logits(model, tokens)
    results["rank"] = dist.get_rank()
    return results


@pytest.fixture(scope="module")
def tp_results(tiny_hf_dir, tiny_tokens, tmp_path_factory):
    return run_on_ranks(tp_layout_checks, 2, tiny_hf_dir, tiny_tokens,
                        str(tmp_path_factory.mktemp("lora_ckpt")))


def _max_diff(a, b):
    return (a[..., :VOCAB] - b[..., :VOCAB]).abs().max().item()


@pytest.mark.slow
def test_adapter_moves_logits_and_merge_matches(tp_results):
    results = tp_results[0]
    for layout in [(1, False), (2, False), (2, True)]:
        r = results[layout]
        assert r["follows_eval"], "adapters added to a model in eval mode must not drop out"
        assert _max_diff(r["lora"], r["base"]) > 1e-2, layout
        assert _max_diff(r["merged"], r["lora"]) <= 1e-5, layout
    pp2 = tp_results[1]  # the last pipeline stage holds the logits
    assert _max_diff(pp2["pp2"], results[(1, False)]["lora"]) <= 1e-5
    assert _max_diff(pp2["pp2_merged"], results[(1, False)]["lora"]) <= 1e-5


@pytest.mark.slow
def test_tp2_with_and_without_sp_matches_tp1(tp_results):
    reference = tp_results[0][(1, False)]
    assert any("embedding" in n for n in reference["trainable"])
    for layout in [(2, False), (2, True)]:
        for rank_results in tp_results:
            r = rank_results[layout]
            assert r["trainable"] == reference["trainable"], layout
            assert _max_diff(r["base"], reference["base"]) <= 1e-5, layout
            assert _max_diff(r["lora"], reference["lora"]) <= 1e-5, layout
            for name, value in reference["values"].items():
                assert torch.equal(r["values"][name], value), (layout, name)
            for name, grad in reference["grads"].items():
                assert grad.abs().max() > 0, name
                diff = (r["grads"][name] - grad).abs().max().item()
                assert diff <= 1e-5, (layout, name, diff)
    # Under SP the factors that see only the rank's tokens are tagged for the TP all-reduce.
    tagged = tp_results[0][(2, True)]["sp_tagged"]
    for name in reference["trainable"]:
        expect = (("linear_qkv_lora" in name or "linear_fc1_lora" in name) and name.endswith(".A")) or \
                 (("linear_proj_lora" in name or "linear_fc2_lora" in name) and name.endswith(".B")) or \
                 "layernorm" in name
        assert (name in tagged) == expect, name


@pytest.mark.slow
def test_frozen_parameters_get_no_gradient(tp_results):
    for rank_results in tp_results:
        for layout in [(1, False), (2, False), (2, True)]:
            r = rank_results[layout]
            assert r["frozen_grads"] == [], layout
            assert "output_layer.weight" not in r["trainable"]
            assert not any("linear_qkv.weight" in n or "linear_fc2.weight" in n for n in r["trainable"])
    # 7 adapters' A and B in 2 layers, 5 norms, the embedding; the lm_head stays frozen.
    assert len(tp_results[0][(1, False)]["trainable"]) == 2 * 7 * 2 + 5 + 1
    summary = tp_results[0][(2, True)]["summary"]
    assert summary == tp_results[0][(1, False)]["summary"] and summary.startswith("trainable parameters:")


@pytest.mark.slow
def test_dropout_masks_agree_across_tp_ranks(tp_results):
    rank0, rank1 = (r[(2, False)]["dropout_grads"] for r in tp_results)
    assert rank0
    for name, grad in rank0.items():
        assert not torch.equal(grad, tp_results[0][(2, False)]["grads"][name]), "dropout must act"
        assert torch.equal(grad, rank1[name]), name


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_loads_at_tp1(tp_results):
    results = tp_results[0]
    assert _max_diff(results["reloaded"], results[(2, False)]["lora"]) <= 1e-5


@pytest.mark.gpu
def test_transformer_engine_adapters_match_local():
    """TE linears (norm fused into qkv/fc1): GPU with Transformer Engine only."""
    pytest.importorskip("transformer_engine")
    if not torch.cuda.is_available():
        pytest.skip("Transformer Engine runs on GPUs only")
    (local, te), = run_on_ranks(te_vs_local, 1, env={"MEGALONG_DEVICE": "cuda"})
    assert _max_diff(te, local) <= 1e-3


def te_vs_local():
    from megalong import runtime
    from megalong.convert.layouts import local_to_te_key
    from megalong.lora.apply import LoraOptions, add_lora, init_lora
    from megalong.config.arch import PRESETS
    from model_logits import full_logits
    from megalong.model.llama import ModelOptions, build_llama

    runtime.init_distributed(ParallelConfig())
    tokens = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    logits, local_state = [], None
    for impl in ("local", "transformer_engine"):
        model = build_llama(PRESETS["tiny"], ModelOptions(seq_length=64, padded_vocab_size=1024,
                                                          attention="full", transformer_impl=impl))
        model.cuda().eval()
        if local_state is None:
            local_state = model.state_dict()
        else:  # the same base weights, under TE's names
            model.load_state_dict({local_to_te_key(k): v for k, v in local_state.items()}, strict=False)
        add_lora(model, LoraOptions(parts=ALL_PARTS))
        init_lora(model, seed=11, b_std=0.3)
        logits.append(full_logits(model, tokens).cpu())
    return logits
