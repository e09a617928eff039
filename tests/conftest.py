"""Shared fixtures: tiny random HF Llama checkpoints written to temp dirs (no downloads)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so spawned ranks can import test modules


def make_hf_llama(path, *, vocab=1001, layers=2, heads=8, kv_heads=2, hidden=64, ffn=160,
                  tie=False, rope_scaling=None, seed=0, dtype="float32"):
    """A random LlamaForCausalLM saved with save_pretrained. Weights are scaled up from HF's
    0.02 init so logits differ clearly between tokens and layouts (a bug cannot hide in noise)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie,
    )
    if isinstance(rope_scaling, dict):
        config.rope_parameters = rope_scaling
    elif rope_scaling:
        config.rope_parameters = {"rope_type": "linear", "factor": rope_scaling, "rope_theta": 10000.0}
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    return str(make_hf_llama(tmp_path_factory.mktemp("hf") / "tiny"))


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory):
    """Llama-3.2-style: rope type llama3, theta 5e5, tied embeddings."""
    return str(make_hf_llama(tmp_path_factory.mktemp("hf") / "llama3", tie=True,
                             rope_scaling=LLAMA3_ROPE, heads=4, kv_heads=2, hidden=128))


@pytest.fixture(scope="session")
def tiny_tokens():
    import torch

    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 1001, (2, 32), generator=generator)
