"""megalong.convert.layouts: HF <-> megatron-core tensor maps, checked bit for bit."""

import pytest
import torch

from megalong.config.hf_config import arch_from_hf_config
from layout_inverses import fc1_from_shards, tp_gather
from megalong.config.arch import padded_vocab_size
from megalong.convert.layouts import (
    fc1_shard,
    fc1_split,
    hf_to_megatron,
    local_to_te_key,
    megatron_to_hf,
    pad_vocab_rows,
    qkv_hf_to_megatron,
    qkv_megatron_to_hf,
    strip_vocab_rows,
    te_to_local_key,
    tp_shard,
)
from megalong.errors import MegalongError

HEADS = [(8, 2), (8, 8), (8, 1), (4, 4)]  # (nh, ng): GQA, MHA, MQA, small MHA


def random_qkv(nh, ng, d, rest, dtype=torch.float64):
    gen = torch.Generator().manual_seed(nh * 100 + ng)
    q = torch.randn(nh * d, *rest, generator=gen, dtype=dtype)
    k = torch.randn(ng * d, *rest, generator=gen, dtype=dtype)
    v = torch.randn(ng * d, *rest, generator=gen, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("nh,ng", HEADS)
@pytest.mark.parametrize("rest", [(24,), (3,), ()])  # weight [.., H], LoRA B [.., r], 1-D
def test_qkv_round_trip(nh, ng, rest):
    q, k, v = random_qkv(nh, ng, 6, rest)
    back = qkv_megatron_to_hf(qkv_hf_to_megatron(q, k, v, nh, ng), nh, ng)
    for want, got in zip((q, k, v), back):
        assert torch.equal(want, got)


@pytest.mark.parametrize("nh,ng", HEADS)
def test_qkv_matches_per_head_reference(nh, ng):
    d = 4
    q, k, v = random_qkv(nh, ng, d, (10,))
    rows = []
    for group in range(ng):  # per kv group: its q heads, then its k head, then its v head
        for head in range(group * nh // ng, (group + 1) * nh // ng):
            rows.append(q[head * d : (head + 1) * d])
        rows.append(k[group * d : (group + 1) * d])
        rows.append(v[group * d : (group + 1) * d])
    assert torch.equal(qkv_hf_to_megatron(q, k, v, nh, ng), torch.cat(rows))


def test_qkv_rejects_bad_shapes():
    q, k, v = random_qkv(8, 2, 4, (16,))
    with pytest.raises(MegalongError, match="k has shape"):
        qkv_hf_to_megatron(q, k[:-1], v, 8, 2)
    with pytest.raises(MegalongError, match="kv groups"):
        qkv_hf_to_megatron(q, k, v, 8, 3)
    with pytest.raises(MegalongError, match="fused qkv"):
        qkv_megatron_to_hf(torch.zeros(13, 16), 8, 2)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_tp_shards_reassemble(dim, size):
    t = torch.randn(8, 12)
    shards = [tp_shard(t, dim, rank, size) for rank in range(size)]
    assert all(s.shape[dim] == t.shape[dim] // size for s in shards)
    assert torch.equal(tp_gather(shards, dim), t)
    with pytest.raises(MegalongError, match="not divisible by tensor-parallel size 3"):
        tp_shard(torch.randn(8, 8), dim, 0, 3)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_fc1_shards(size):
    gate, up = torch.randn(16, 6), torch.randn(16, 6)
    shards = [fc1_shard(gate, up, rank, size) for rank in range(size)]
    rows = 16 // size
    assert torch.equal(shards[-1][:rows], gate[-rows:]) and torch.equal(shards[-1][rows:], up[-rows:])
    got_gate, got_up = fc1_from_shards(shards)
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)
    got_gate, got_up = fc1_split(torch.cat([gate, up]))
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)


def test_vocab_padding():
    assert padded_vocab_size(1001) == 1024
    assert padded_vocab_size(32001, 128, 2) == 32256
    assert padded_vocab_size(32000, 128, 2) == 32000
    assert padded_vocab_size(1001, 1, 2) == 1002
    w = torch.randn(1001, 8)
    padded = pad_vocab_rows(w, 1024)
    assert padded.shape == (1024, 8) and torch.equal(padded[:1001], w) and not padded[1001:].any()
    assert torch.equal(strip_vocab_rows(padded, 1001), w)
    with pytest.raises(MegalongError, match="exceeds the padded vocab size"):
        pad_vocab_rows(w, 1000)


def test_te_key_mapping():
    pairs = {
        "decoder.layers.3.input_layernorm.weight": "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.pre_mlp_layernorm.weight": "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
    }
    for local, te in pairs.items():
        assert local_to_te_key(local) == te and te_to_local_key(te) == local
    for same in ("decoder.final_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.weight"):
        assert local_to_te_key(same) == same == te_to_local_key(same)


# ---------------------------------------------------------------------------------------------
# Whole-model maps on a random tiny LlamaForCausalLM.


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_llama(request):
    from conftest import random_hf_llama

    model = random_hf_llama(tie=request.param)
    arch, interpolation = arch_from_hf_config(model.config.to_dict(), "tiny")
    assert interpolation is None and arch.tie_word_embeddings == request.param
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        del state["lm_head.weight"]
    return arch, state


def full_megatron(arch, state, padded_vocab, **kw):
    return hf_to_megatron(
        state.__getitem__,
        arch,
        tp_rank=kw.get("tp_rank", 0),
        tp_size=kw.get("tp_size", 1),
        padded_vocab=padded_vocab,
        layer_range=kw.get("layer_range", (0, arch.num_layers)),
        pre_process=kw.get("pre_process", True),
        post_process=kw.get("post_process", True),
    )


def test_megatron_to_hf_inverts_hf_to_megatron(tiny_llama):
    arch, state = tiny_llama
    padded = padded_vocab_size(arch.vocab_size)
    megatron = full_megatron(arch, state, padded)
    assert megatron["embedding.word_embeddings.weight"].shape == (padded, 64)
    assert ("output_layer.weight" in megatron) == (not arch.tie_word_embeddings)
    exported = list(megatron_to_hf(megatron.__getitem__, arch, padded_vocab=padded))
    assert [name for name, _ in exported] == list(state)  # HF's own order
    for name, tensor in exported:
        assert torch.equal(tensor, state[name]), name


def test_tp2_shards_concatenate_to_tp1(tiny_llama):
    arch, state = tiny_llama
    padded = padded_vocab_size(arch.vocab_size, 128, tp=2)
    tp1 = full_megatron(arch, state, padded)
    ranks = [full_megatron(arch, state, padded, tp_rank=r, tp_size=2) for r in range(2)]
    assert all(set(rank) == set(tp1) for rank in ranks)
    for key, full in tp1.items():
        shards = [rank[key] for rank in ranks]
        if key.endswith("mlp.linear_fc1.weight"):
            got = torch.cat(fc1_from_shards(shards))
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            got = torch.cat(shards, 1)
        elif "layernorm" in key:
            assert torch.equal(shards[0], shards[1])
            got = shards[0]
        else:  # qkv, embedding, output layer: split on rows
            got = torch.cat(shards, 0)
        assert torch.equal(got, full), key


def test_pipeline_stage_uses_local_layer_indices(tiny_llama):
    arch, state = tiny_llama
    padded = padded_vocab_size(arch.vocab_size)
    tp1 = full_megatron(arch, state, padded)
    last = full_megatron(arch, state, padded, layer_range=(1, 2), pre_process=False)
    first = full_megatron(arch, state, padded, layer_range=(0, 1), post_process=False)
    assert "embedding.word_embeddings.weight" in first and "decoder.final_layernorm.weight" not in first
    assert "embedding.word_embeddings.weight" not in last
    assert not any(k.startswith("decoder.layers.1.") for k in {**first, **last})
    for key, tensor in last.items():
        global_key = key.replace("decoder.layers.0.", "decoder.layers.1.")
        if key == "output_layer.weight" and arch.tie_word_embeddings:
            # megatron-core's last stage keeps its own copy of the tied embedding
            global_key = "embedding.word_embeddings.weight"
        assert torch.equal(tensor, tp1[global_key]), key


def test_hf_to_megatron_checks_shapes_and_tp(tiny_llama):
    arch, state = tiny_llama
    with pytest.raises(MegalongError, match="tensor-model-parallel-size 4 does not divide num_key_value_heads 2"):
        full_megatron(arch, state, 1024, tp_size=4)
    bad = dict(state, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 64)})
    with pytest.raises(MegalongError, match=r"model.layers.1.mlp.up_proj.weight has shape \(3, 64\)"):
        full_megatron(arch, bad, 1024)
