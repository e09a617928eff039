"""A random Llama written as an HF checkpoint directory (the demo and benchmarks start from one;
nothing is downloaded)."""

import torch

from megalong.convert.hf_checkpoint import write_hf_checkpoint
from megalong.convert.hf_config import hf_config_from_arch
from megalong.model.arch import LlamaArch


def hf_tensor_shapes(arch: LlamaArch):
    """(name, shape) of every HF LlamaForCausalLM tensor, in HF's order."""
    hidden, d = arch.hidden_size, arch.head_dim
    yield "model.embed_tokens.weight", (arch.vocab_size, hidden)
    for i in range(arch.num_layers):
        prefix = f"model.layers.{i}."
        yield prefix + "self_attn.q_proj.weight", (arch.num_attention_heads * d, hidden)
        yield prefix + "self_attn.k_proj.weight", (arch.num_kv_heads * d, hidden)
        yield prefix + "self_attn.v_proj.weight", (arch.num_kv_heads * d, hidden)
        yield prefix + "self_attn.o_proj.weight", (hidden, arch.num_attention_heads * d)
        yield prefix + "mlp.gate_proj.weight", (arch.ffn_hidden_size, hidden)
        yield prefix + "mlp.up_proj.weight", (arch.ffn_hidden_size, hidden)
        yield prefix + "mlp.down_proj.weight", (hidden, arch.ffn_hidden_size)
        yield prefix + "input_layernorm.weight", (hidden,)
        yield prefix + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", (arch.vocab_size, hidden)


def write_random_hf_model(out_dir, arch: LlamaArch, *, seed: int = 0, std: float = 0.02,
                          overwrite: bool = False) -> None:
    generator = torch.Generator().manual_seed(seed)

    def tensors():
        for name, shape in hf_tensor_shapes(arch):
            if len(shape) == 1:
                yield name, torch.ones(shape)
            else:
                yield name, torch.randn(shape, generator=generator) * std

    config = hf_config_from_arch(arch, interpolation_factor=None,
                                 base_config={"bos_token_id": 1, "eos_token_id": 2})
    write_hf_checkpoint(out_dir, tensors(), config, overwrite=overwrite)
