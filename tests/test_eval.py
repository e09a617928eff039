"""megalong.eval: perplexity equals LongLoRA's definition computed with HF transformers (TP=1,
TP=2, PP=2, a padded vocabulary, interpolation read from config.json); KV-cache generation equals
recomputation and HF's greedy output; the passkey prompt builder and scorer; reports; the CLIs
end to end and their one-line errors."""

import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from megalong.config.parallel import ParallelConfig
from megalong.errors import MegalongError
from megalong.eval.data import window_starts
from megalong.eval.passkey import (
    FILLER_SENTENCES, QUESTION, TASK, build_passkey_prompt, fit_passkey_prompt, generated_number,
    key_line, passkey_correct, summarize, sweep_cases,
)
from megalong.spawn import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
VOCAB = 1001
SEQ_LENGTHS, STRIDE = [32, 96], 24


# ---------------------------------------------------------------- windows (pure)


def longlora_window_starts(num_tokens, seq_length, stride):
    """LongLoRA's get_as_batch, verbatim in effect: range(0, n - L, stride), last one dropped."""
    starts = list(range(0, num_tokens - seq_length, stride))
    starts.pop()
    return starts


def test_window_starts_follow_longlora():
    for n, length, stride in [(1000, 100, 256), (5000, 1024, 256), (300, 32, 24), (257, 128, 64)]:
        assert window_starts(n, length, stride) == longlora_window_starts(n, length, stride)
    spread = window_starts(10_000, 100, 10, max_windows=5)
    full = window_starts(10_000, 100, 10)
    assert len(spread) == 5 and spread[0] == 0 and spread[-1] == full[-1] and set(spread) <= set(full)
    assert window_starts(1000, 100, 256, max_windows=100) == longlora_window_starts(1000, 100, 256)
    with pytest.raises(MegalongError, match="needs more than 356"):
        window_starts(300, 100, 256)


# ---------------------------------------------------------------- passkey (pure)


def test_passkey_prompt_places_the_key_at_the_requested_depth(sp_model):
    from megalong.data.tokenizer import load_tokenizer

    encode = load_tokenizer(sp_model).encode
    sentence_tokens = max(len(encode(s)) for s in FILLER_SENTENCES) + 1
    for target in (300, 1000):
        for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
            prompt = fit_passkey_prompt(encode, target, depth, "48213")
            length = len(encode(prompt.text)) + 1  # + BOS
            assert target - 2 * sentence_tokens <= length <= target, (target, length)
            total = prompt.filler_before + prompt.filler_after
            assert prompt.filler_before == round(depth * total)
            assert abs(prompt.depth - depth) <= 0.5 / total + 1e-9
            # Where the key line really is: after exactly filler_before sentences of filler.
            text = prompt.text
            assert text.startswith(TASK) and text.endswith(QUESTION)
            assert text.count("48213") == 2 and text.count(key_line("48213")) == 1
            before = text[len(TASK):prompt.key_offset]
            assert sum(before.count(s) for s in FILLER_SENTENCES) == prompt.filler_before
            # ... and in tokens, at the requested share of the filler.
            filler_start = len(encode(TASK))
            filler_tokens = length - 1 - filler_start - len(encode(key_line("48213") + "\n" + QUESTION))
            key_token = len(encode(text[:prompt.key_offset]))
            assert abs((key_token - filler_start) / filler_tokens - depth) < 0.05, (depth, key_token)
    # Reproducible and distinct keys; a too-short length names the minimum.
    cases = sweep_cases([100, 200], [0.0, 1.0], 3, seed=7)
    assert cases == sweep_cases([100, 200], [0.0, 1.0], 3, seed=7) and len(cases) == 12
    assert all(len(c.key) == 5 and c.key.isdigit() for c in cases) and len({c.key for c in cases}) > 6
    with pytest.raises(MegalongError, match="shorter than the prompt without filler"):
        fit_passkey_prompt(encode, 20, 0.5, "12345")
    with pytest.raises(MegalongError, match="5 digits"):
        build_passkey_prompt("1234", 1, 1)


def test_passkey_scorer_counts_only_exact_matches():
    assert passkey_correct(" 48213.", "48213")
    assert passkey_correct("48213 is the pass key", "48213")
    assert passkey_correct("\n48213\n48213", "48213")
    for wrong in ("", "4821", "482133", " 48213"[:-1], "48 213", "48312", "the key", "148213",
                  "1 48213"):
        assert not passkey_correct(wrong, "48213"), wrong
    assert generated_number("is 0042.") == "0042" and generated_number("none") is None
    records = [{"length": L, "depth": d, "correct": ok} for L, d, ok in
               [(100, 0.0, True), (100, 0.0, False), (100, 1.0, True), (200, 0.0, False),
                (200, 1.0, False)]]
    summary = summarize(records, [100, 200, 300], [0.0, 1.0])
    assert summary["accuracy_by_length"] == {"100": 2 / 3, "200": 0.0, "300": None}
    assert summary["grid"] == [[0.5, 0.0, None], [1.0, 0.0, None]]
    assert summary["accuracy"] == 0.4


def test_top_p_sampling_keeps_the_nucleus():
    from megalong.eval.generate import Sampling, choose_next_token

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert choose_next_token(logits, Sampling()).tolist() == [0]
    generator = torch.Generator().manual_seed(0)
    picks = {choose_next_token(logits, Sampling(1.0, 0.7), generator).item() for _ in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.7: the rest is never drawn
    picks = {choose_next_token(logits, Sampling(1.0, 0.4), generator).item() for _ in range(50)}
    assert picks == {0}
    picks = {choose_next_token(logits, Sampling(1.0, 1.0), generator).item() for _ in range(400)}
    assert picks == {0, 1, 2, 3}
    with pytest.raises(MegalongError, match="top-p"):
        Sampling(1.0, 0.0).validate()


# ---------------------------------------------------------------- data and reports (no model)


def test_eval_tokens_read_indexed_datasets_and_flat_files(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megalong.eval.data import open_eval_tokens

    data = open_eval_tokens(corpus, vocab_size=1000)
    dataset = IndexedDataset(corpus)
    concatenated = np.concatenate([dataset[i] for i in range(len(dataset))])
    assert data.kind == "indexed" and np.array_equal(data.tokens, concatenated)
    assert np.array_equal(open_eval_tokens(corpus + ".bin", vocab_size=1000).tokens, concatenated)
    big = tmp_path / "big.bin"
    np.array([0, 70_000, 5], dtype=np.uint32).tofile(big)
    assert open_eval_tokens(str(big), vocab_size=128_256).tokens.tolist() == [0, 70_000, 5]
    with pytest.raises(MegalongError, match="outside the model's vocabulary"):
        open_eval_tokens(str(big), vocab_size=1001, dtype="uint32")
    with pytest.raises(MegalongError, match="no such token file"):
        open_eval_tokens(str(tmp_path / "nothing"), vocab_size=1001)


def test_reports_write_json_markdown_and_plots(tmp_path):
    from megalong.eval import report as reports

    ppl = {"kind": "perplexity", "results": [
        {"seq_length": n, "windows": 3, "predictions": 3 * (n - 1), "loss": math.log(p), "ppl": p}
        for n, p in [(128, 40.0), (256, 35.5), (1024, 1e5)]]}
    assert "| 256 | 3 | 765 | 3.5695 | 35.5 |" in reports.ppl_markdown(ppl)
    table = reports.ppl_comparison_markdown({"base": ppl, "lora": ppl})
    assert table.splitlines()[0] == "| model | ppl @ 128 | ppl @ 256 | ppl @ 1024 |"
    assert "| lora | 40 | 35.5 | 1e+05 |" in table
    reports.write_json(str(tmp_path / "sub" / "ppl.json"), ppl)
    assert reports.read_json(str(tmp_path / "sub" / "ppl.json")) == ppl
    reports.plot_ppl({"base": ppl}, str(tmp_path / "ppl.png"), marker_length=1024)
    passkey = {"lengths": [100, 200], "depths": [0.0, 0.5], "trials": 2, "grid": [[1.0, 0.5], [0.0, None]],
               "accuracy_by_length": {"100": 0.5, "200": 0.5}}
    markdown = reports.passkey_markdown(passkey)
    assert "| 100 | 4 | 0.5 |" in markdown and "| 0.5 | 0 | - |" in markdown
    reports.plot_passkey(passkey, str(tmp_path / "passkey.png"))
    for name in ("ppl.png", "passkey.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_bootstrap_intervals_cover_and_pair():
    """Percentile intervals: they hold the point estimate, shrink with more windows, and a paired
    difference of two models that differ by a constant loss is that constant, whatever the
    windows' own spread (the text's difficulty cancels)."""
    from megalong.eval.bootstrap import paired_ppl_difference, ppl_interval

    rng = np.random.default_rng(0)
    few, many = rng.normal(2.5, 0.4, 12), rng.normal(2.5, 0.4, 400)
    for losses in (few, many):
        low, high = ppl_interval(losses)
        assert low < math.exp(losses.mean()) < high
    width = lambda losses: np.subtract(*ppl_interval(losses)[::-1])  # noqa: E731
    assert width(many) < width(few) / 3
    delta, low, high = paired_ppl_difference(many + 0.01, many)
    assert low > 0 and high - low < 0.2 * delta and low <= delta <= high
    unpaired_low, unpaired_high = ppl_interval(many)
    assert high - low < (unpaired_high - unpaired_low) / 5
    with pytest.raises(ValueError, match="differ in number"):
        paired_ppl_difference(few, many)


def test_pattern_ablation_table(tmp_path):
    """The ablation's table reads the reports it names and pairs the windows."""
    from megalong.eval.pattern_ablation import main

    (tmp_path / "eval").mkdir()
    (tmp_path / "logs").mkdir()
    rng = np.random.default_rng(1)
    windows = rng.normal(2.5, 0.3, 20)
    shifts = {"base_pi_dense": 1.0, "full_dense": 0.0, "short_dense": 0.3, "short_own": 0.1,
              "s2_dense": 0.2, "s2_own": 0.05}
    probes = {"full_dense": -2.0, "s2_dense": -1.0, "base_dense": -1.5}  # in the dense reports

    def row(n, shift, probe=None):
        losses = (windows + shift).tolist()
        return {"seq_length": n, "probe": probe, "windows": 20, "ppl": math.exp(np.mean(losses)),
                "group_size": n // 4, "window_losses": losses}

    for n, name, shift in [(n, name, shift) for n in (64, 128) for name, shift in shifts.items()] \
            + [(32, "base_dense", 0.0)]:
        rows = [row(n, shift)] + ([row(n, probes[name], "repeat")] if name in probes else [])
        (tmp_path / "eval" / f"N{n}_{name}.json").write_text(json.dumps(
            {"kind": "perplexity", "results": rows}))
    (tmp_path / "logs" / "N64_s2.log").write_text(
        "trainable parameters: 1,000 of 9,000\niter 10/20 | loss 2.500000 | 900 tok/s |\n"
        "iter 20/20 | loss 2.250000 | 1,100 tok/s |\n")
    main([str(tmp_path), "--base-length", "32", "--targets", "64,128"])
    table = (tmp_path / "table.md").read_text()
    assert "N=64 (2x), G=16 = 0.5x base" in table and "N=128 (4x), G=32 = 1x base" in table
    paired = math.exp(np.mean(windows) + 0.2) - math.exp(np.mean(windows))
    assert f"| S²-Attn | dense | {paired:+.2f} [" in table
    assert "| 64 | S²-Attn | 1,000 of 9,000 | 1,000 | 2.250 |" in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"]["N128_s2_own"] == pytest.approx(math.exp(np.mean(windows) + 0.05))
    probe = math.exp(np.mean(windows) - 1.0)
    assert f"| S²-Attn | {probe:.2f} [" in table and "| short attention (groups, no shift) | - |" in table
    assert "The base model at its own context (32 tokens): ordinary windows " in table
    assert (tmp_path / "ablation_patterns.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- the model on ranks


def hf_reference_ppl(hf_dir, tokens, seq_length, stride):
    """LongLoRA's eval with HF transformers: per window, HF's own loss (labels = inputs)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for start in window_starts(len(tokens), seq_length, stride):
            x = torch.from_numpy(tokens[start:start + seq_length].astype(np.int64))[None]
            losses.append(model(input_ids=x, labels=x).loss.item())
    return math.exp(sum(losses) / len(losses))


def hf_greedy(hf_dir, prompt, max_new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist(), model.generation_config.eos_token_id


def eval_checks(sources, tokens, prompt, max_new_tokens, eos_id, sample=False):
    """On every rank, for each model source: perplexity rows, greedy tokens with and without the
    KV cache, decode-step logits against a full forward, and (optionally) seeded top-p samples."""
    from megalong.eval.generate import Sampling, _last_logits, generate_one
    from megalong.eval.runs import build_eval_model, init_eval_runtime
    from megalong.eval.perplexity import evaluate_perplexity
    from model_logits import full_logits
    from megatron.core.inference.contexts import StaticInferenceContext

    results = []
    for source in sources:
        init_eval_runtime(source)
        model = build_eval_model(source, 128)
        rows = evaluate_perplexity(model, tokens, SEQ_LENGTHS, stride=STRIDE, progress=False)
        kwargs = dict(max_new_tokens=max_new_tokens, vocab_size=VOCAB, eos_id=eos_id)
        cached = generate_one(model, prompt, **kwargs)
        recomputed = generate_one(model, prompt, use_cache=False, **kwargs)
        # Decode steps one token at a time against the full causal forward of the same sequence.
        sequence = torch.tensor([prompt + cached])
        context = StaticInferenceContext(1, sequence.shape[1])
        prefill = len(prompt)
        steps = [_last_logits(model, sequence[:, :prefill], torch.arange(prefill)[None], context)]
        for position in range(prefill, sequence.shape[1]):
            context.sequence_len_offset = position
            context.enable_decode_mode()
            steps.append(_last_logits(model, sequence[:, position:position + 1],
                                      torch.tensor([[position]]), context))
        full = full_logits(model, sequence)
        step_error = None
        if full is not None:
            stepped = torch.cat([s for s in steps], dim=0)[:, :VOCAB]
            step_error = (stepped - full[0, prefill - 1:, :VOCAB]).abs().max().item()
            assert torch.isinf(full[..., VOCAB:]).all()
        samples = None
        if sample:
            top_p = Sampling(temperature=1.0, top_p=0.9, seed=5)
            samples = [generate_one(model, prompt, sampling=top_p, **kwargs) for _ in range(2)]
        results.append({"rows": rows, "cached": cached, "recomputed": recomputed,
                        "step_error": step_error, "samples": samples})
    return results


@pytest.fixture(scope="module")
def eval_tokens():
    return np.random.default_rng(0).integers(0, VOCAB, 400).astype(np.uint16)


@pytest.fixture(scope="module")
def interpolated_hf_dir(tmp_path_factory):
    from conftest import make_hf_llama

    return str(make_hf_llama(tmp_path_factory.mktemp("hf") / "linear4", rope_scaling=4.0, seed=3))


def assert_matches_hf(result, hf_dir, tokens, prompt, name):
    for row in result["rows"]:
        reference = hf_reference_ppl(hf_dir, tokens, row["seq_length"], STRIDE)
        assert abs(row["ppl"] - reference) <= 1e-4 * reference, (name, row, reference)
        assert row["windows"] == len(longlora_window_starts(len(tokens), row["seq_length"], STRIDE))
    greedy, _ = hf_greedy(hf_dir, prompt, len(result["cached"]))
    assert result["cached"] == result["recomputed"] == greedy, name


@pytest.fixture(scope="module")
def yarn_hf_dir(tmp_path_factory):
    from conftest import make_hf_llama

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
            "rope_theta": 10000.0}
    return str(make_hf_llama(tmp_path_factory.mktemp("hf") / "yarn4", rope_scaling=yarn, seed=4))


@pytest.fixture(scope="module")
def family_hf_dirs(tmp_path_factory):
    """One tiny random model per family beyond Llama (test_families' configs)."""
    from test_families import FAMILY_KWARGS, random_hf_model

    dirs = {}
    for family in FAMILY_KWARGS:
        dirs[family] = str(tmp_path_factory.mktemp("hf") / family)
        random_hf_model(family, seed=5).save_pretrained(dirs[family], safe_serialization=True)
    return dirs


@pytest.mark.slow
def test_tp1_perplexity_and_generation_match_hf(tiny_hf_dir, interpolated_hf_dir, yarn_hf_dir,
                                                family_hf_dirs, eval_tokens):
    """Perplexity (LongLoRA's definition) and greedy generation equal transformers' for Llama
    with plain RoPE, linear interpolation and YaRN, and for Mistral, Qwen2 and Qwen3."""
    from megalong.source import resolve_model_source

    prompt = random.Random(1).sample(range(VOCAB), 10)
    _, eos_id = hf_greedy(tiny_hf_dir, prompt, 1)
    dirs = {"tp1": tiny_hf_dir, "tp1, factor 4": interpolated_hf_dir, "tp1, yarn": yarn_hf_dir,
            **{f"tp1, {family}": path for family, path in family_hf_dirs.items()}}
    sources = [resolve_model_source(hf_dir=path) for path in dirs.values()]
    assert sources[1].interpolation_factor == 4.0 and sources[2].arch.yarn_rope
    results, = run_on_ranks(eval_checks, 1, sources, eval_tokens, prompt, 20, eos_id)
    for (name, path), result in zip(dirs.items(), results):
        assert_matches_hf(result, path, eval_tokens, prompt, name)
        assert result["step_error"] <= 1e-4, name
        assert len(result["cached"]) == 20 or result["cached"][-1] == eos_id


@pytest.mark.slow
def test_tp2_pp2_and_a_converted_checkpoint_match_hf(tiny_hf_dir, tiny_megatron_ckpt, eval_tokens):
    from megalong.source import resolve_model_source

    prompt = random.Random(2).sample(range(VOCAB), 12)
    _, eos_id = hf_greedy(tiny_hf_dir, prompt, 1)
    tp2, pp2 = (ParallelConfig(tensor_model_parallel_size=2),
                ParallelConfig(pipeline_model_parallel_size=2))
    sources = [resolve_model_source(hf_dir=tiny_hf_dir, parallel=tp2),
               resolve_model_source(load=tiny_megatron_ckpt, parallel=tp2),  # written at TP=1
               resolve_model_source(hf_dir=tiny_hf_dir, parallel=pp2)]
    rank0, rank1 = run_on_ranks(eval_checks, 2, sources, eval_tokens, prompt, 16, eos_id, sample=True)
    for name, result in [("tp2", rank0[0]), ("tp2 checkpoint", rank0[1]), ("pp2", rank1[2])]:
        assert_matches_hf(result, tiny_hf_dir, eval_tokens, prompt, name)
        assert result["step_error"] <= 1e-4, name
        first, second = result["samples"]
        assert first == second and (len(first) == 16 or first[-1] == eos_id), name
    for a, b in zip(rank0, rank1):  # every rank returns the same numbers and tokens
        assert [r["ppl"] for r in a["rows"]] == [r["ppl"] for r in b["rows"]]
        assert a["cached"] == b["cached"] and a["samples"] == b["samples"]
    assert rank0[2]["step_error"] is None  # the first pipeline stage holds no logits


# ---------------------------------------------------------------- --eval-attention s2 / short


def hf_pattern_window_losses(hf_dir, tokens, seq_length, stride, pattern, group_size):
    """Each window's loss from HF transformers' Llama whose attention is the float64 mask
    formula of the pattern (test_attention.pattern_masks), per head."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    from test_attention import pattern_masks

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, heads, n, d = query.shape
        per_kv = heads // key.shape[1]
        masks = pattern_masks(n, group_size, heads, pattern)
        outs = []
        for h in range(heads):
            scores = query[:, h].double() @ key[:, h // per_kv].double().transpose(-1, -2)
            scores = (scores * scaling).masked_fill(~masks[h], float("-inf"))
            outs.append(scores.softmax(-1) @ value[:, h // per_kv].double())
        return torch.stack(outs, dim=2).to(query.dtype), None  # [b, n, heads, d]

    name = f"megalong_test_{pattern}_{group_size}"
    AttentionInterface.register(name, attend)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                                 attn_implementation=name).eval()
    losses = []
    with torch.no_grad():
        for start in window_starts(len(tokens), seq_length, stride):
            x = torch.from_numpy(tokens[start:start + seq_length].astype(np.int64))[None]
            losses.append(model(input_ids=x, labels=x).loss.item())
    return losses


def pattern_evals(sources, token_file, attentions):
    """eval_ppl's rank function for each (source, eval attention), micro-batches of 2 windows;
    last, the repeat probe with dense attention."""
    from megalong.config.model import EvalAttention
    from megalong.eval.runs import eval_ppl_on_ranks

    return [[eval_ppl_on_ranks(source, token_file, SEQ_LENGTHS, STRIDE, None, 2, None, False,
                               attention) for attention in attentions]
            + [eval_ppl_on_ranks(source, token_file, SEQ_LENGTHS, STRIDE, None, 2, None, False,
                                 EvalAttention(), True)] for source in sources]


def hf_repeat_probe_losses(hf_dir, tokens, seq_length, stride):
    """Each probe window's loss from HF transformers: the window's first half twice, the mean
    token loss over the second copy's tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    half, losses = seq_length // 2, []
    with torch.no_grad():
        for start in window_starts(len(tokens), seq_length, stride):
            chunk = torch.from_numpy(tokens[start:start + half].astype(np.int64))
            x = torch.cat([chunk, chunk])[None]
            logits = model(input_ids=x).logits[0, half - 1:-1]
            losses.append(torch.nn.functional.cross_entropy(logits, x[0, half:]).item())
    return losses


@pytest.mark.slow
def test_eval_attention_patterns_match_the_mask_formula(tiny_hf_dir, eval_tokens, tmp_path):
    """--eval-attention s2 and short equal HF's Llama with the float64 mask formula as its
    attention, window by window: G a ratio of each length or fixed; at TP=1 with two
    data-parallel ranks sharing the windows, and at TP=2 (each rank its heads' slice). The
    repeat probe (--repeat-probe) equals HF's loss on the second copy."""
    from megalong.config.model import EvalAttention
    from megalong.source import resolve_model_source

    token_file = str(tmp_path / "tokens.bin")
    eval_tokens.tofile(token_file)
    attentions = [EvalAttention(pattern="s2"), EvalAttention(pattern="short"),
                  EvalAttention(pattern="s2", group_size=16), EvalAttention()]
    sources = [resolve_model_source(hf_dir=tiny_hf_dir),
               resolve_model_source(hf_dir=tiny_hf_dir,
                                    parallel=ParallelConfig(tensor_model_parallel_size=2))]
    rank0, rank1 = run_on_ranks(pattern_evals, 2, sources, token_file, attentions)
    for a, b in zip(sum(rank0, []), sum(rank1, [])):  # every rank returns the same numbers
        assert [r["window_losses"] for r in a["results"]] == \
            [r["window_losses"] for r in b["results"]]
    for name, reports in zip(("tp1 dp2", "tp2"), rank0):
        ordinary, probes = reports[4]["results"][::2], reports[4]["results"][1::2]
        assert [r["probe"] for r in probes] == ["repeat"] * len(SEQ_LENGTHS)
        assert [r["window_losses"] for r in ordinary] == \
            [r["window_losses"] for r in reports[3]["results"]]
        for row, dense in zip(probes, reports[3]["results"]):
            want = hf_repeat_probe_losses(tiny_hf_dir, eval_tokens, row["seq_length"], STRIDE)
            assert max(abs(a - b) for a, b in zip(row["window_losses"], want)) <= 1e-4, name
            assert row["predictions"] == len(want) * row["seq_length"] // 2
            # other tokens than the ordinary windows' (a random model cannot copy, so the
            # perplexities themselves stay close)
            assert max(abs(a - b) for a, b in zip(row["window_losses"],
                                                  dense["window_losses"])) > 1e-2, name
        for attention, report in zip(attentions[:3], reports):
            assert report["eval_attention"] == attention.pattern
            for row, dense in zip(report["results"], reports[3]["results"]):
                group = attention.group_size or row["seq_length"] // 4
                assert row["group_size"] == group
                want = hf_pattern_window_losses(tiny_hf_dir, eval_tokens, row["seq_length"],
                                                STRIDE, attention.pattern, group)
                got = row["window_losses"]
                assert len(got) == len(want) == row["windows"], name
                assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4, (name, attention)
                reference = math.exp(sum(want) / len(want))
                assert abs(row["ppl"] - reference) <= 1e-4 * reference, (name, attention)
                # and not dense attention's numbers
                assert abs(row["ppl"] - dense["ppl"]) > 1e-2 * dense["ppl"], (name, attention)


# ---------------------------------------------------------------- CLIs


def run_tool(tool, *args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(TOOLS, tool), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_clis_end_to_end(tiny_megatron_ckpt, corpus, sp_model, tmp_path):
    """eval_ppl on an IndexedDataset, passkey and generate, each writing JSON (and plots)."""
    ppl_json, passkey_json = tmp_path / "ppl.json", tmp_path / "passkey.json"
    done = run_tool("eval_ppl.py", "--load", tiny_megatron_ckpt, "--data", corpus,
                    "--seq-lengths", "32,64", "--stride", "128", "--max-windows", "6",
                    "--json", ppl_json, "--plot", tmp_path / "ppl.png")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(ppl_json.read_text())
    assert [r["windows"] for r in report["results"]] == [6, 6]
    assert report["data"]["format"] == "indexed" and "| 64 | 6 | 378 |" in done.stdout
    assert "[eval_ppl] seq-length 64: 6/6 windows" in done.stderr
    done = run_tool("passkey.py", "--load", tiny_megatron_ckpt, "--tokenizer", sp_model,
                    "--lengths", "150,200", "--depths", "0,1", "--trials", "2",
                    "--json", passkey_json, "--plot", tmp_path / "passkey.png", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(passkey_json.read_text())
    assert len(report["cases"]) == 8 and len(report["grid"]) == 2
    assert all(c["prompt_tokens"] <= c["length"] for c in report["cases"])
    assert "| depth \\ length | 150 | 200 |" in done.stdout
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The grass is green."}\n{"prompt": "What is the pass key?"}\n')
    done = run_tool("generate.py", "--load", tiny_megatron_ckpt, "--tokenizer", sp_model,
                    "--prompt-file", prompts, "--max-new-tokens", "5", "--json", tmp_path / "g.json")
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = json.loads((tmp_path / "g.json").read_text())["outputs"]
    assert len(outputs) == 2 and all(0 < len(o["tokens"]) <= 5 for o in outputs)
    assert (tmp_path / "ppl.png").exists() and (tmp_path / "passkey.png").exists()


def test_bad_inputs_give_one_line_errors(tiny_hf_dir, sp_model, tmp_path):
    short = tmp_path / "short.bin"
    np.arange(100, dtype=np.uint16).tofile(short)
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    model = ["--hf-dir", tiny_hf_dir]
    cases = [
        ("eval_ppl.py", [*model, "--data", short, "--seq-lengths", "64"], "needs more than 320"),
        ("eval_ppl.py", [*model, "--data", tmp_path / "none", "--seq-lengths", "8"], "no such token file"),
        ("eval_ppl.py", [*model, "--data", short, "--seq-lengths", "8", "--stride", "0"], "--stride must be >= 1"),
        ("eval_ppl.py", [*model, "--data", short, "--seq-lengths", "8", "--tensor-model-parallel-size", "3"],
         "tensor-model-parallel-size 3 does not divide"),
        ("eval_ppl.py", ["--hf-dir", tmp_path, "--data", short, "--seq-lengths", "8"], "config.json not found"),
        ("eval_ppl.py", ["--load", tmp_path, "--data", short, "--seq-lengths", "8"], "not a megalong checkpoint"),
        ("eval_ppl.py", [*model, "--data", short, "--seq-lengths", "8", "--stride", "8", "--json", tmp_path],
         "is a directory"),
        ("passkey.py", [*model, "--tokenizer", sp_model, "--lengths", "300", "--depths", "1.5"],
         r"--depths must lie in \[0, 1\]"),
        ("passkey.py", [*model, "--tokenizer", sp_model, "--lengths", "50"], "shorter than the prompt"),
        ("passkey.py", [*model, "--lengths", "300"], "holds no tokenizer files; pass --tokenizer"),
        ("generate.py", [*model, "--tokenizer", sp_model, "--prompt-file", tmp_path / "none.txt"],
         "does not exist"),
        ("generate.py", [*model, "--tokenizer", sp_model, "--prompt-file", prompt, "--temperature", "-1"],
         "--temperature must be >= 0"),
    ]
    for tool, args, message in cases:
        done = run_tool(tool, *args, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (tool, args, done.stderr)
        assert lines[0].startswith("error: ") and re.search(message, lines[0]), (message, lines)
    assert not any(p.suffix == ".json" for p in tmp_path.iterdir())


@pytest.mark.slow
def test_passkey_and_generate_with_a_tokenizer_without_bos(tiny_megatron_ckpt, no_bos_tokenizer,
                                                          tmp_path):
    """Qwen-style tokenizer (no BOS): prompts are the text's tokens alone, filling the length."""
    passkey_json, generated = tmp_path / "passkey.json", tmp_path / "g.json"
    done = run_tool("passkey.py", "--load", tiny_megatron_ckpt, "--tokenizer", no_bos_tokenizer,
                    "--lengths", "150", "--depths", "0.5", "--trials", "1", "--json", passkey_json,
                    "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    (case,) = json.loads(passkey_json.read_text())["cases"]
    assert 140 < case["prompt_tokens"] <= 150
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The grass is green."}\n')
    done = run_tool("generate.py", "--load", tiny_megatron_ckpt, "--tokenizer", no_bos_tokenizer,
                    "--prompt-file", prompts, "--max-new-tokens", "3", "--json", generated)
    assert done.returncode == 0, done.stderr[-2000:]
    (output,) = json.loads(generated.read_text())["outputs"]
    from megalong.data.tokenizer import load_tokenizer

    assert output["prompt_tokens"] == len(load_tokenizer(no_bos_tokenizer).encode("The grass is green."))
