"""The weight map (megalong/config/weight_map.py) against the models it describes: HF
LlamaForCausalLM's parameters, a built megatron model's state dict at TP=2 and PP=2, the LoRA
adapters' geometry and the planner's parameter counts."""

import pytest

from megalong.config import weight_map
from megalong.config.arch import LlamaArch
from megalong.config.parallel import ParallelConfig
from megalong.spawn import run_on_ranks

# GQA, vocab divisible neither by 2 nor by 128.
ARCH = LlamaArch(hidden_size=64, num_layers=2, num_attention_heads=8, num_kv_heads=2,
                 ffn_hidden_size=160, vocab_size=1001, max_position_embeddings=128)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_shapes_are_llama_for_causal_lm_parameters_in_order(tie):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = ARCH.with_(tie_word_embeddings=tie)
    config = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         intermediate_size=arch.ffn_hidden_size,
                         num_hidden_layers=arch.num_layers,
                         num_attention_heads=arch.num_attention_heads,
                         num_key_value_heads=arch.num_kv_heads, tie_word_embeddings=tie)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    hf = [(name, tuple(p.shape)) for name, p in model.state_dict().items()
          if not (tie and name == "lm_head.weight")]
    assert list(weight_map.hf_tensor_shapes(arch)) == hf
    for name, shape in hf:
        assert weight_map.hf_tensor_shape(name, arch) == shape
    assert weight_map.hf_tensor_shape("model.layers.2.self_attn.q_proj.weight", arch) is None
    assert weight_map.hf_tensor_shape("model.rotary_emb.inv_freq", arch) is None
    # LoRA parts are the HF linears: (in, out) is the transposed weight shape.
    state = dict(hf)
    for part, (fan_in, fan_out) in weight_map.linear_shapes(arch).items():
        assert state[weight_map.lora_module(part, 1) + ".weight"] == (fan_out, fan_in)


def test_derived_names():
    from megalong.config import lora as options
    from megalong.config import peft
    from megalong.lora import peft_io
    from megalong.model.spec import NORM_KEYS_TO_TE

    assert options.PART_ORDER == ("q", "k", "v", "o", "gate", "up", "down")
    assert options.TARGET_PARTS["fc1"] == ("gate", "up") and options.TARGET_PARTS["fc2"] == ("down",)
    assert weight_map.PART_TO_HF_MODULE["gate"] == "gate_proj"
    assert peft_io.factor_key(3, "o", "A") == \
        "base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight"
    # Qwen3's q/k norms are in the "norm" group (LongLoRA's substring rule; PEFT's modules_to_save
    # matches "norm" as a name suffix anyway).
    assert peft.EXTRA_MODULES == {"embed": ("embed_tokens",),
                                  "norm": ("q_norm", "k_norm", "input_layernorm",
                                           "post_attention_layernorm", "norm")}
    assert NORM_KEYS_TO_TE == {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                               "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    assert weight_map.te_key("decoder.layers.1.pre_mlp_layernorm.weight") == \
        "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"


def test_planner_counts_the_maps_linears():
    from megalong.plan import layer_linear_params, lora_part_params

    shapes = weight_map.linear_shapes(ARCH)
    params = layer_linear_params(ARCH)
    for linear, mapping in weight_map.LINEARS.items():
        assert params[linear] == sum(shapes[p][0] * shapes[p][1] for p in mapping.parts)
    assert params["linear_qkv"] == ARCH.hidden_size * ARCH.qkv_size
    for part, (a, b, a_split, b_split) in lora_part_params(ARCH, 4).items():
        fan_in, fan_out = shapes[part]
        assert (a, b) == (4 * fan_in, fan_out * 4)
        assert b_split == (weight_map.PART_TO_LINEAR[part] in ("linear_qkv", "linear_fc1")) != a_split


def built_state_shapes(arch, tp, pp):
    """On every rank: {state_dict key: shape} of this rank's model (local spec) with LoRA on
    every part, and the adapters' full part shapes."""
    from megalong import runtime
    from megalong.lora.apply import add_lora, iter_adapters
    from megalong.config.lora import LoraOptions
    from megalong.model.llama import ModelOptions, build_llama

    runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                            pipeline_model_parallel_size=pp))
    padded = arch.padded_vocab(128, tp)
    model = build_llama(arch, ModelOptions(seq_length=16, padded_vocab_size=padded,
                                           attention="full", initialize=False))
    base = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    add_lora(model, LoraOptions(parts=weight_map.LORA_PARTS))
    adapters = {part: shape for _, _, _, lora in iter_adapters(model)
                for part, shape in lora.full_shapes.items()}
    return base, adapters, model.pre_process, model.post_process


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,tie", [(2, 1, False), (1, 2, True)])
def test_every_megatron_parameter_is_in_the_map(tp, pp, tie):
    arch = ARCH.with_(tie_word_embeddings=tie)
    for base, adapters, pre, post in run_on_ranks(built_state_shapes, tp * pp, arch, tp, pp):
        layers = range(arch.num_layers // pp)
        expected = {
            weight_map.at(m.megatron, layer): weight_map.megatron_shape(
                m, arch, padded_vocab=arch.padded_vocab(128, tp), tp=tp)
            for m, layer in weight_map.placed(arch, layers, pre_process=pre, post_process=post)}
        assert base == expected
        assert adapters == weight_map.linear_shapes(arch)
