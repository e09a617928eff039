"""LoRA checkpoints out to and in from Hugging Face: a PEFT adapter that peft loads onto the HF
base, a merged HF model, and the adapter (or LongLoRA's adapter + trainable_params.bin) imported
back — all giving megalong's logits. Bad adapters fail in one line and leave nothing behind."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_llama
from megalong.spawn import run_on_ranks
from test_model import hf_logits
from megalong.config.parallel import ParallelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "checkpoint_convert.py")
VOCAB = 1001
ALL_PARTS = ("q", "k", "v", "o", "gate", "up", "down")


def convert(*args):
    return subprocess.run([sys.executable, CONVERT, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def make_lora_checkpoint(hf_dir, root, tokens):
    """At TP=2: the HF weights, random A and B on every linear, a perturbed embedding and norms
    (trained LoRA+ extras), saved as a megalong checkpoint. Returns megalong's logits."""
    from megalong import runtime
    from megalong.checkpoint import save_checkpoint
    from megalong.config.checkpoint import CheckpointMetadata
    from megalong.convert.hf_checkpoint import HFCheckpointReader
    from megalong.convert.layouts import tp_shard
    from megalong.convert.model_io import load_hf_weights
    from megalong.lora.apply import LoraOptions, add_lora, init_lora, is_norm_param, lora_metadata
    from model_logits import full_logits
    from megalong.model.llama import ModelOptions, build_llama

    tp = 2
    runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    reader = HFCheckpointReader(hf_dir)
    arch, _ = reader.arch()
    model = build_llama(arch, ModelOptions(seq_length=128, padded_vocab_size=1024, attention="full",
                                           initialize=False))
    load_hf_weights(model, reader.get, arch, 1024)
    options = LoraOptions(rank=4, alpha=8.0, parts=ALL_PARTS)
    add_lora(model, options)
    init_lora(model, seed=3, b_std=0.3)
    gen = torch.Generator().manual_seed(5)
    rank = torch.distributed.get_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "embedding.word_embeddings.weight":
                param.add_(tp_shard(0.05 * torch.randn(1024, arch.hidden_size, generator=gen), 0, rank, tp))
            elif is_norm_param(name):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.eval()
    logits = full_logits(model, tokens)
    metadata = CheckpointMetadata(
        arch=arch, padded_vocab_size=1024, seq_length=128, tensor_model_parallel_size=tp,
        source=hf_dir, hf_config=reader.config, lora=lora_metadata(options, ("embed", "norm")))
    save_checkpoint([model], root, iteration=7, metadata=metadata)
    return logits[..., :VOCAB]


def lora_checkpoint_logits(loads, tokens):
    """At TP=1: each checkpoint rebuilt from its metadata (adapters included) and its logits."""
    from megalong import runtime
    from megalong.checkpoint import load_checkpoint
    from megalong.config.checkpoint import read_metadata
    from megalong.lora.apply import LoraOptions, add_lora
    from model_logits import full_logits
    from megalong.model.llama import ModelOptions, build_llama

    runtime.init_distributed(ParallelConfig())
    out = []
    for load in loads:
        meta = read_metadata(load)
        model = build_llama(meta.arch, ModelOptions(
            seq_length=128, padded_vocab_size=meta.padded_vocab_size, attention="full",
            initialize=False))
        add_lora(model, LoraOptions.from_metadata(meta.lora))
        load_checkpoint([model], load)
        model.eval()
        out.append((full_logits(model, tokens), meta))
    return out


def make_lora_checkpoints(jobs, tokens):
    return [make_lora_checkpoint(hf_dir, root, tokens) for hf_dir, root in jobs]


@pytest.fixture(scope="module")
def lora_ckpts(tiny_hf_dir, tiny_tokens, tmp_path_factory):
    """{"untied": (root, logits), "tied": (hf dir, root, logits)}, made in one 2-rank launch."""
    directory = tmp_path_factory.mktemp("lora")
    tied_hf = str(make_hf_llama(directory / "tied_hf", tie=True))
    jobs = [(tiny_hf_dir, str(directory / "ckpt")), (tied_hf, str(directory / "tied_ckpt"))]
    logits, tied_logits = run_on_ranks(make_lora_checkpoints, 2, jobs, tiny_tokens)[0]
    return {"untied": (jobs[0][1], logits), "tied": (tied_hf, jobs[1][1], tied_logits)}


@pytest.fixture(scope="module")
def lora_ckpt(lora_ckpts):
    return lora_ckpts["untied"]


@pytest.fixture(scope="module")
def exported(lora_ckpt, tmp_path_factory):
    root, _ = lora_ckpt
    out = tmp_path_factory.mktemp("export")
    merged, adapter = out / "merged", out / "adapter"
    result = convert("megatron-to-hf", "--load", root, "--out", merged, "--merge-lora",
                     "--peft-adapter", adapter)
    assert result.returncode == 0, result.stderr
    return merged, adapter


def peft_logits(base_dir, adapter_dir, tokens):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.slow
def test_peft_adapter_and_merged_export_give_megalong_logits(lora_ckpt, exported, tiny_hf_dir,
                                                             tiny_tokens):
    _, reference = lora_ckpt
    merged, adapter = exported
    base = hf_logits(tiny_hf_dir, tiny_tokens)
    assert (base - reference).abs().max() > 1e-2, "the adapters and extras must change the model"
    assert (peft_logits(tiny_hf_dir, adapter, tiny_tokens) - reference).abs().max() <= 1e-4
    assert (hf_logits(str(merged), tiny_tokens) - reference).abs().max() <= 1e-4
    config = json.load(open(adapter / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"]
    assert config["modules_to_save"] == ["embed_tokens", "input_layernorm",
                                         "post_attention_layernorm", "norm"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.weight"].shape == (VOCAB, 64), "unpadded"
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
    assert not any("lm_head" in key for key in tensors)


@pytest.mark.slow
def test_tied_embedding_adapter_loads_in_peft(lora_ckpts, tiny_tokens, tmp_path):
    """Llama-3.2-style tied embeddings: the trained embedding is also the lm_head."""
    hf_dir, root, reference = lora_ckpts["tied"]
    result = convert("megatron-to-hf", "--load", root, "--peft-adapter", tmp_path / "adapter")
    assert result.returncode == 0, result.stderr
    assert (hf_logits(hf_dir, tiny_tokens) - reference).abs().max() > 1e-2
    assert (peft_logits(hf_dir, tmp_path / "adapter", tiny_tokens) - reference).abs().max() <= 1e-4


def _longlora_form(adapter, directory):
    """LongLoRA's release: factors in adapter_model.bin, embedding (one added pad row: vocab + 1)
    and norms in trainable_params.bin, no modules_to_save."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    factors = {k: v for k, v in tensors.items() if ".lora_" in k}
    extras = {k: v for k, v in tensors.items() if ".lora_" not in k}
    key = "base_model.model.model.embed_tokens.weight"
    extras[key] = torch.cat([extras[key], torch.randn(1, extras[key].shape[1])])
    directory.mkdir()
    torch.save(factors, directory / "adapter_model.bin")
    torch.save(extras, directory / "trainable_params.bin")
    config = json.load(open(adapter / "adapter_config.json"))
    config["modules_to_save"] = None
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.slow
def test_imported_adapters_give_megalong_logits(lora_ckpt, exported, tiny_hf_dir, tiny_tokens,
                                                tmp_path):
    _, reference = lora_ckpt
    _, adapter = exported
    longlora = _longlora_form(adapter, tmp_path / "longlora")
    peft_tp2, longlora_tp1 = tmp_path / "peft_tp2", tmp_path / "longlora_tp1"
    for argv in (["--peft-adapter", adapter, "--out", peft_tp2, "--tp", 2],
                 ["--peft-adapter", longlora, "--out", longlora_tp1]):
        result = convert("hf-to-megatron", "--hf-dir", tiny_hf_dir, *argv)
        assert result.returncode == 0, result.stderr
    (peft_logits_tp1, meta), (longlora_logits, longlora_meta) = run_on_ranks(
        lora_checkpoint_logits, 1, [str(peft_tp2), str(longlora_tp1)], tiny_tokens)[0]
    assert meta.lora == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "parts": list(ALL_PARTS),
                            "trainable_params": ["embed", "norm"]}
    assert (peft_logits_tp1[..., :VOCAB] - reference).abs().max() <= 1e-4
    assert longlora_meta.arch.vocab_size == VOCAB + 1, "the pad row grows the vocabulary"
    assert (longlora_logits[..., :VOCAB] - reference).abs().max() <= 1e-4


def _bad_adapters(tmp_path, adapter):
    """(name, adapter dir, message fragment) for adapters that must be refused."""
    def variant(name, edit_config=None, edit_tensors=None):
        directory = tmp_path / name
        shutil.copytree(adapter, directory)
        if edit_config:
            config = json.load(open(directory / "adapter_config.json"))
            edit_config(config)
            (directory / "adapter_config.json").write_text(json.dumps(config))
        if edit_tensors:
            tensors = load_file(directory / "adapter_model.safetensors")
            edit_tensors(tensors)
            save_file(tensors, directory / "adapter_model.safetensors")
        return directory

    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    return [
        ("missing", tmp_path / "nope", "does not exist"),
        ("dora", variant("dora", lambda c: c.update(use_dora=True)), "use_dora is not supported"),
        ("lm_head target", variant("lm_head", lambda c: c.update(target_modules=["q_proj", "lm_head"])),
         "lm_head cannot be adapted"),
        ("wrong shape", variant("shape", edit_tensors=lambda t: t.update({q_a: torch.zeros(4, 32)})),
         "q_proj.lora_A.weight has shape (4, 32)"),
        ("missing factor", variant("gap", edit_tensors=lambda t: t.pop(q_a)), "lora_A.weight is missing"),
        ("wrong norm", variant("norm", edit_tensors=lambda t: t.update(
            {"base_model.model.model.norm.weight": torch.ones(32)})), "model.norm.weight has shape (32,)"),
        ("extra layer", variant("layer", edit_tensors=lambda t: t.update(
            {q_a.replace("layers.0", "layers.5"): torch.zeros(4, 64)})), "has layer 5"),
    ]


@pytest.mark.slow
def test_bad_inputs_fail_in_one_line_and_leave_nothing(lora_ckpt, exported, tiny_hf_dir, tmp_path):
    root, _ = lora_ckpt
    _, adapter = exported
    base_ckpt = tmp_path / "base_ckpt"
    (base_ckpt / "iter_0000000").mkdir(parents=True)
    (base_ckpt / "latest_checkpointed_iteration.txt").write_text("0")
    # Only its metadata is read before the error: a base model's, without adapters.
    from megalong.config.arch import PRESETS
    from megalong.config.checkpoint import CheckpointMetadata

    metadata = CheckpointMetadata(arch=PRESETS["tiny"], padded_vocab_size=1024, seq_length=64)
    (base_ckpt / "iter_0000000" / "megalong.json").write_text(json.dumps(metadata.to_json()))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    out = tmp_path / "out"
    cases = [(name, ["hf-to-megatron", "--hf-dir", tiny_hf_dir, "--out", out, "--peft-adapter", path],
              fragment) for name, path, fragment in _bad_adapters(tmp_path, adapter)]
    cases += [
        ("no adapters to merge", ["megatron-to-hf", "--load", base_ckpt, "--out", out, "--merge-lora"],
         "holds no LoRA adapters"),
        ("unmerged export", ["megatron-to-hf", "--load", root, "--out", out], "pass --merge-lora"),
        ("nothing to write", ["megatron-to-hf", "--load", root], "needs --out"),
        ("adapter dir busy", ["megatron-to-hf", "--load", root, "--peft-adapter", busy], "not empty"),
    ]
    before = sorted(os.listdir(tmp_path))
    for name, argv, fragment in cases:
        result = convert(*argv)
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and fragment in lines[-1], (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert sorted(os.listdir(tmp_path)) == before, name
    assert (busy / "keep.txt").read_text() == "user data"


@pytest.mark.slow
def test_bfloat16_export_matches_the_float32_export_rounded(lora_ckpt, exported, tiny_hf_dir,
                                                           tmp_path):
    """--dtype bfloat16 builds the exporting model in bf16 (half the RAM): every tensor equals the
    float32 export rounded to bf16 — exactly where no adapter was merged, within one bf16 step
    where one was (the adapters were rounded to bf16 before the float32 merge)."""
    from megalong.convert.hf_checkpoint import HFCheckpointReader

    root, _ = lora_ckpt
    merged32, adapter32 = exported
    merged16, adapter16 = tmp_path / "merged16", tmp_path / "adapter16"
    result = convert("megatron-to-hf", "--load", root, "--out", merged16, "--merge-lora",
                     "--peft-adapter", adapter16, "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    targets = json.loads((adapter32 / "adapter_config.json").read_text())["target_modules"]
    full, half = HFCheckpointReader(merged32), HFCheckpointReader(merged16)
    base = HFCheckpointReader(tiny_hf_dir)
    assert json.loads((merged16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sorted(full._file_of) == sorted(half._file_of)
    for name in full._file_of:
        got, want = half.get(name), full.get(name).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16, name
        if any(f".{module}." in name for module in targets):
            # a float32 checkpoint: base weights and adapters rounded to bf16 before the merge,
            # the sum rounded again — a few bf16 steps of the tensor's scale, far below the update
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * scale)
            update = (want.float() - base.get(name)).abs().max().item()
            assert update > 16 * 2**-7 * scale, name  # the tolerance cannot hide a missing merge
        else:
            assert torch.equal(got, want), name
    adapter_full = load_file(adapter32 / "adapter_model.safetensors")
    adapter_half = load_file(adapter16 / "adapter_model.safetensors")
    assert adapter_full.keys() == adapter_half.keys()
    for name, tensor in adapter_full.items():
        assert torch.equal(adapter_half[name], tensor.to(torch.bfloat16)), name
