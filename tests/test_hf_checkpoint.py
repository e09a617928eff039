"""megalong.convert.hf_checkpoint and hf_config: HF checkpoint directories and config.json."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megalong.convert.hf_checkpoint import HFCheckpointReader, write_hf_checkpoint
from megalong.config.arch import validate_tp
from megalong.config.hf_config import arch_from_hf_config, hf_config_from_arch
from megalong.config.arch import padded_vocab_size
from megalong.convert.layouts import hf_to_megatron, megatron_to_hf
from megalong.errors import MegalongError
from megalong.config.arch import PRESETS, LlamaArch

TOKENIZER_STUBS = {
    "tokenizer_config.json": '{"model_max_length": 4096}\n',
    "special_tokens_map.json": '{"bos_token": "<s>"}\n',
    "tokenizer.model": "not really sentencepiece\n",
}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base_model(request, tmp_path_factory):
    """A random tiny Llama saved by transformers, with stub tokenizer files beside it."""
    from conftest import random_hf_llama

    model = random_hf_llama(tie=request.param)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    for name, text in TOKENIZER_STUBS.items():
        (path / name).write_text(text)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if request.param:
        del state["lm_head.weight"]
    return path, state


def assert_nothing_left(parent, expected=()):
    assert sorted(os.listdir(parent)) == sorted(expected)


# ---------------------------------------------------------------------------------------------
# Reading.


def test_reader_reads_transformers_checkpoint(base_model):
    path, state = base_model
    with HFCheckpointReader(path) as reader:
        assert set(reader.names()) == set(state)
        for name, tensor in state.items():
            assert torch.equal(reader.get(name), tensor)
        arch, interpolation = reader.arch()
    assert (arch.hidden_size, arch.num_kv_heads, arch.vocab_size, interpolation) == (64, 2, 1001, None)


@pytest.mark.parametrize("shards", [1, 3])
def test_reader_reads_bin(tmp_path, base_model, shards):
    path, state = base_model
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    names = list(state)
    if shards == 1:
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        weight_map = {}
        for k in range(shards):
            file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
            torch.save({n: state[n] for n in names[k::shards]}, tmp_path / file)
            weight_map.update({n: file for n in names[k::shards]})
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = HFCheckpointReader(tmp_path)
    assert sorted(reader.names()) == sorted(names)
    for name in names:
        assert torch.equal(reader.get(name), state[name])


def test_reader_errors(tmp_path, base_model):
    path, _ = base_model
    with pytest.raises(MegalongError, match="does not exist"):
        HFCheckpointReader(tmp_path / "nope")
    with pytest.raises(MegalongError, match="config.json not found"):
        HFCheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MegalongError, match="cannot read .*config.json"):
        HFCheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(MegalongError, match="no weights in"):
        HFCheckpointReader(tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MegalongError, match="names shard model-00002-of-00002.safetensors, which is missing"):
        HFCheckpointReader(tmp_path)
    os.remove(tmp_path / "model.safetensors.index.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(MegalongError, match="cannot read weights file"):
        HFCheckpointReader(tmp_path)
    reader = HFCheckpointReader(path)
    missing = f"tensor model.layers.7.mlp.up_proj.weight not found in HF checkpoint {path}"
    with pytest.raises(MegalongError, match=missing):
        reader.get("model.layers.7.mlp.up_proj.weight")


# ---------------------------------------------------------------------------------------------
# Writing.


def test_write_read_round_trip_sharded(tmp_path, base_model):
    path, state = base_model
    out = tmp_path / "out"
    calls = []
    write_hf_checkpoint(
        out,
        iter(state.items()),
        {"model_type": "llama"},
        max_shard_bytes=100_000,
        copy_from=path,
        progress=lambda n, b: calls.append((n, b)),
    )
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n > 2 and shards == [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    assert "model.safetensors.index.json" in files and "generation_config.json" in files
    for name, text in TOKENIZER_STUBS.items():
        assert (out / name).read_text() == text
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == total and list(index["weight_map"]) == list(state)
    assert len(calls) == n and calls[-1] == (len(state), total)
    reader = HFCheckpointReader(out)
    assert reader.names() == list(state)
    for name, tensor in state.items():
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    assert_nothing_left(tmp_path, ["out"])


def test_single_shard_has_no_index(tmp_path, base_model):
    _, state = base_model
    write_hf_checkpoint(tmp_path / "out", state.items(), {"model_type": "llama"})
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert sorted(HFCheckpointReader(tmp_path / "out").names()) == sorted(state)


def test_transformers_loads_export(tmp_path, base_model):
    """HF -> megatron (TP=1, padded vocab) -> write_hf_checkpoint -> LlamaForCausalLM.from_pretrained."""
    from transformers import LlamaForCausalLM

    path, state = base_model
    reader = HFCheckpointReader(path)
    arch, _ = reader.arch()
    padded = padded_vocab_size(arch.vocab_size)
    megatron = hf_to_megatron(
        reader.get,
        arch,
        tp_rank=0,
        tp_size=1,
        padded_vocab=padded,
        layer_range=(0, arch.num_layers),
        pre_process=True,
        post_process=True,
    )
    config = hf_config_from_arch(arch, interpolation_factor=4.0, base_config=reader.config)
    out = tmp_path / "export"
    write_hf_checkpoint(
        out, megatron_to_hf(megatron.__getitem__, arch, padded_vocab=padded), config,
        max_shard_bytes=200_000, copy_from=path,
    )
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.max_position_embeddings == 128
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 4.0
    assert model.model.rotary_emb.rope_type == "linear"
    loaded = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    if arch.tie_word_embeddings:
        assert torch.equal(loaded["lm_head.weight"], state["model.embed_tokens.weight"])


def test_failed_write_leaves_nothing(tmp_path, base_model):
    _, state = base_model

    def tensors_then_crash():
        for k, item in enumerate(state.items()):
            if k == 10:
                raise RuntimeError("boom")
            yield item

    with pytest.raises(RuntimeError, match="boom"):
        write_hf_checkpoint(tmp_path / "out", tensors_then_crash(), {}, max_shard_bytes=10_000)
    assert_nothing_left(tmp_path)
    with pytest.raises(MegalongError, match="no tensors to write"):
        write_hf_checkpoint(tmp_path / "out", iter(()), {})
    assert_nothing_left(tmp_path)
    duplicated = [("a", torch.zeros(2)), ("a", torch.ones(2))]
    with pytest.raises(MegalongError, match="tensor a given twice"):
        write_hf_checkpoint(tmp_path / "out", duplicated, {})
    assert_nothing_left(tmp_path)


def test_existing_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty dir is fine
    write_hf_checkpoint(out, [("a", torch.zeros(2))], {"v": 1})
    with pytest.raises(MegalongError, match="is not empty"):
        write_hf_checkpoint(out, [("b", torch.ones(2))], {"v": 2})
    assert json.loads((out / "config.json").read_text()) == {"v": 1}
    def crash():
        yield "b", torch.ones(2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # a failed overwrite keeps the old checkpoint
        write_hf_checkpoint(out, crash(), {"v": 2}, overwrite=True)
    assert json.loads((out / "config.json").read_text()) == {"v": 1}
    (out / "stale.txt").write_text("old")
    write_hf_checkpoint(out, [("b", torch.ones(2))], {"v": 2}, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert HFCheckpointReader(out).names() == ["b"]
    assert_nothing_left(tmp_path, ["out"])


def test_views_are_written_alone(tmp_path):
    fused = torch.arange(12.0).reshape(6, 2)
    write_hf_checkpoint(tmp_path / "out", [("q", fused[:2]), ("k", fused[2:4]), ("t", fused.t())], {})
    reader = HFCheckpointReader(tmp_path / "out")
    assert torch.equal(reader.get("k"), fused[2:4]) and torch.equal(reader.get("t"), fused.t())


# ---------------------------------------------------------------------------------------------
# config.json <-> LlamaArch.

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "vocab_size": 32001,
}


def test_rope_scaling_transformers4_and_5():
    v4 = dict(LLAMA2_7B, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 8.0})
    v5 = dict(LLAMA2_7B, rope_parameters={"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0})
    arch4, factor4 = arch_from_hf_config(v4, "v4/config.json")
    arch5, factor5 = arch_from_hf_config(v5, "v5/config.json")
    assert arch4 == arch5 and factor4 == factor5 == 8.0
    assert (arch4.max_position_embeddings, arch4.vocab_size, arch4.head_dim) == (4096, 32001, 128)
    plain, factor = arch_from_hf_config(dict(LLAMA2_7B, rope_scaling=None), "c")
    assert factor is None and plain.rope_theta == 10000.0
    assert arch_from_hf_config(dict(LLAMA2_7B, rope_parameters={"rope_theta": 5e5}), "c")[0].rope_theta == 5e5


def test_llama3_rope_and_tied_embeddings():
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = dict(
        LLAMA2_7B, hidden_size=2048, num_hidden_layers=16, num_key_value_heads=8, vocab_size=128256,
        head_dim=64, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=True,
    )
    arch, factor = arch_from_hf_config(cfg, "c")
    assert factor is None and arch.tie_word_embeddings and arch.rope_theta == 5e5
    assert arch.llama3_rope == {k: v for k, v in scaling.items() if k != "rope_type"}
    assert arch.head_dim_override is None and arch.head_dim == 64
    back = hf_config_from_arch(arch, interpolation_factor=None)
    assert back["rope_scaling"] == scaling and back["rope_parameters"] == dict(scaling, rope_theta=5e5)
    with pytest.raises(MegalongError, match="llama3"):
        hf_config_from_arch(arch, interpolation_factor=2.0)


def test_head_dim_override():
    arch, _ = arch_from_hf_config(dict(LLAMA2_7B, head_dim=96), "c")
    assert arch.head_dim_override == 96 and arch.head_dim == 96
    assert hf_config_from_arch(arch, interpolation_factor=None)["head_dim"] == 96


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "gemma"}, "odd/config.json: model_type 'gemma' is not supported"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "do not include LlamaForCausalLM"),
        ({"rope_scaling": {"type": "longrope", "factor": 4.0}},
         "rope type 'longrope' is not supported; megalong supports default, linear, llama3 and yarn"),
        ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "rope type 'dynamic' is not supported"),
        ({"rope_scaling": {"type": "linear", "factor": -1}}, "rope scaling factor must be >= 1"),
        ({"num_key_value_heads": 5}, "num_attention_heads 32 is not a multiple of num_key_value_heads 5"),
        ({"hidden_size": 4001}, "hidden_size 4001 is not a multiple of num_attention_heads 32"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
        (
            {
                "rope_scaling": {"type": "linear", "factor": 2.0},
                "rope_parameters": {"rope_type": "linear", "factor": 4.0},
            },
            "disagree",
        ),
    ],
)
def test_refused_configs(change, message):
    with pytest.raises(MegalongError, match=message):
        arch_from_hf_config(dict(LLAMA2_7B, **change), "odd/config.json")


@pytest.mark.parametrize("factor", [None, 4.0])
def test_config_from_arch_loads_in_transformers(tmp_path, factor):
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = PRESETS["tiny"]
    cfg = hf_config_from_arch(arch, interpolation_factor=factor, base_config={"eos_token_id": 7, "foo": 1})
    assert cfg["max_position_embeddings"] == arch.max_position_embeddings and cfg["eos_token_id"] == 7
    assert "foo" not in cfg
    if factor is None:
        assert cfg["rope_scaling"] is None and cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    else:
        assert cfg["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 4.0}
        assert cfg["rope_theta"] == 10000.0
    assert arch_from_hf_config(cfg, "c") == (arch, factor)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = LlamaConfig.from_pretrained(tmp_path)
    config.save_pretrained(tmp_path / "again")  # survives a transformers round trip too
    config = LlamaConfig.from_pretrained(tmp_path / "again")
    assert arch_from_hf_config(config.to_dict(), "again") == (arch, factor)
    rotary = LlamaForCausalLM(config).model.rotary_emb
    assert rotary.rope_type == ("default" if factor is None else "linear")
    assert config.rope_parameters.get("factor") == factor and config.max_position_embeddings == 256


def test_validate_tp():
    arch = PRESETS["llama2-70b"]
    validate_tp(arch, 8, 4)
    too_wide = r"tensor-model-parallel-size 16 does not divide num_key_value_heads 8; use one of \[1, 2, 4, 8\]"
    with pytest.raises(MegalongError, match=too_wide):
        validate_tp(arch, 16, 1)
    with pytest.raises(MegalongError, match=r"pipeline-model-parallel-size 3 does not divide num_hidden_layers 80"):
        validate_tp(arch, 1, 3)
    with pytest.raises(MegalongError, match="intermediate_size 100"):
        validate_tp(LlamaArch(64, 2, 4, 4, 100, 10), 8, 1)


def test_hf_config_imports_without_torch():
    code = "import sys, megalong.config.hf_config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
