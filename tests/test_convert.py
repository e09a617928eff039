"""tools/checkpoint_convert.py end to end: HF -> megatron (TP=2) -> HF, checkpoint resharding,
interpolation in config.json, and bad input (one line, exit 2, nothing left on disk)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_llama
from megalong.spawn import run_on_ranks
from test_model import hf_logits
from megalong.config.parallel import ParallelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "checkpoint_convert.py")


def convert(*args):
    return subprocess.run([sys.executable, CONVERT, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def hf_state(directory):
    state = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(directory, name)))
    return state


def logits_from_checkpoint(load, tokens, layouts):
    """On every rank, per (tp, pp): build from the checkpoint metadata, load, return logits."""
    from megalong import runtime
    from megalong.checkpoint import load_checkpoint
    from megalong.config.checkpoint import read_metadata
    from model_logits import full_logits
    from megalong.model.llama import ModelOptions, build_llama

    meta = read_metadata(load)
    out = []
    for tp, pp in layouts:
        runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        opts = ModelOptions(seq_length=tokens.shape[1], padded_vocab_size=meta.padded_vocab_size,
                            attention="full", interpolation_factor=meta.interpolation_factor,
                            initialize=False)
        model = build_llama(meta.arch, opts)
        load_checkpoint([model], load)
        model.eval()
        logits = full_logits(model, tokens)
        out.append(None if logits is None else logits[..., : meta.arch.vocab_size])
    return out


def resave_at_tp2(load, save):
    """Load at TP=2, save at TP=2 (a training-style save by two ranks)."""
    from megalong import runtime
    from megalong.checkpoint import load_checkpoint, save_checkpoint
    from megalong.config.checkpoint import read_metadata
    from megalong.model.llama import ModelOptions, build_llama

    meta = read_metadata(load)
    runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    opts = ModelOptions(seq_length=32, padded_vocab_size=meta.padded_vocab_size,
                        interpolation_factor=meta.interpolation_factor, initialize=False)
    model = build_llama(meta.arch, opts)
    load_checkpoint([model], load)
    save_checkpoint([model], save, iteration=5, metadata=meta.replace(tensor_model_parallel_size=2))


@pytest.mark.slow
def test_round_trip_tp2_is_bit_exact_and_loads_in_transformers(tiny_hf_dir, tiny_tokens, tmp_path):
    mc, back = tmp_path / "mc", tmp_path / "back"
    result = convert("hf-to-megatron", "--hf-dir", tiny_hf_dir, "--out", mc, "--tp", 2)
    assert result.returncode == 0, result.stderr
    result = convert("megatron-to-hf", "--load", mc, "--out", back, "--max-shard-size-gb", 0.0001)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(back / "model.safetensors.index.json"), "small shards -> an index"
    original, exported = hf_state(tiny_hf_dir), hf_state(back)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    assert torch.allclose(hf_logits(str(back), tiny_tokens), hf_logits(tiny_hf_dir, tiny_tokens))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    # The TP=2 checkpoint loads at TP=1, TP=2 and PP=2 with HF's logits; a checkpoint saved by
    # two TP ranks loads at TP=1 with the same logits.
    resaved = tmp_path / "resaved"
    run_on_ranks(resave_at_tp2, 2, str(mc), str(resaved))
    reference = hf_logits(tiny_hf_dir, tiny_tokens)
    (tp1,) = run_on_ranks(logits_from_checkpoint, 1, str(mc), tiny_tokens, [(1, 1)])[0]
    (resaved_tp1,) = run_on_ranks(logits_from_checkpoint, 1, str(resaved), tiny_tokens, [(1, 1)])[0]
    tp2, pp2 = run_on_ranks(logits_from_checkpoint, 2, str(mc), tiny_tokens, [(2, 1), (1, 2)])[1]
    for name, logits in [("tp1", tp1), ("resaved tp2->tp1", resaved_tp1), ("tp2", tp2), ("pp2", pp2)]:
        assert (logits - reference).abs().max() <= 1e-4, name


@pytest.mark.slow
def test_interpolation_factor_is_written_both_ways_and_reloads(tiny_hf_dir, tmp_path):
    from transformers import AutoConfig

    mc, back = tmp_path / "mc", tmp_path / "back"
    # max_position_embeddings 128 -> seq 512 gives the default factor ceil(512/128) = 4.
    assert convert("hf-to-megatron", "--hf-dir", tiny_hf_dir, "--out", mc, "--seq-length", 512).returncode == 0
    assert convert("megatron-to-hf", "--load", mc, "--out", back).returncode == 0
    config = json.load(open(back / "config.json"))
    assert config["max_position_embeddings"] == 128
    assert config["rope_scaling"]["factor"] == 4.0 and config["rope_scaling"]["type"] == "linear"
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    reloaded = AutoConfig.from_pretrained(back)
    assert reloaded.rope_parameters["rope_type"] == "linear"
    assert reloaded.rope_parameters["factor"] == 4.0
    # Import reads the factor back from the exported config.json.
    again = tmp_path / "again"
    assert convert("hf-to-megatron", "--hf-dir", back, "--out", again).returncode == 0
    assert json.load(open(again / "iter_0000000" / "megalong.json"))["interpolation_factor"] == 4.0


def _bad_inputs(tmp_path, hf_dir):
    """(name, argv, message fragment) for each bad input."""
    not_llama = tmp_path / "not_llama"
    not_llama.mkdir()
    (not_llama / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    wrong_shape = tmp_path / "wrong_shape"
    make_hf_llama(wrong_shape, hidden=32, heads=8, kv_heads=2, ffn=160)
    config = json.load(open(wrong_shape / "config.json"))
    config["intermediate_size"] = 96  # config and weights disagree
    (wrong_shape / "config.json").write_text(json.dumps(config))
    not_ckpt = tmp_path / "not_ckpt"
    not_ckpt.mkdir()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    out = tmp_path / "out"
    to_mc = ["hf-to-megatron", "--out", out, "--hf-dir"]
    return [
        ("missing hf dir", [*to_mc, tmp_path / "nope"], "does not exist"),
        ("missing config", [*to_mc, not_ckpt], "config.json"),
        ("corrupt config", [*to_mc, corrupt], "cannot read"),
        ("not llama", [*to_mc, not_llama], "gpt2"),
        ("tp vs heads", [*to_mc, hf_dir, "--tp", 3], "tensor-model-parallel-size 3"),
        ("tp vs kv heads", [*to_mc, hf_dir, "--tp", 4], "num_key_value_heads 2"),
        ("pp vs layers", [*to_mc, hf_dir, "--pp", 3], "pipeline-model-parallel-size 3"),
        ("no weights", [*to_mc, no_weights], "weight"),
        ("shape mismatch", [*to_mc, wrong_shape], "shape"),
        ("out not empty", ["hf-to-megatron", "--hf-dir", hf_dir, "--out", busy], "not empty"),
        ("missing load", ["megatron-to-hf", "--load", tmp_path / "nope", "--out", out], "does not exist"),
        ("load not a checkpoint", ["megatron-to-hf", "--load", not_ckpt, "--out", out],
         "latest_checkpointed_iteration.txt"),
    ]


@pytest.mark.slow
def test_bad_inputs_fail_in_one_line_and_leave_nothing(tiny_hf_dir, tmp_path):
    for name, argv, fragment in _bad_inputs(tmp_path, tiny_hf_dir):
        result = convert(*argv)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and fragment in lines[-1], (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert not (tmp_path / "out").exists(), name
        assert not [p for p in os.listdir(tmp_path) if ".tmp" in p], name
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"
