"""Shared fixtures: tiny random HF Llama checkpoints written to temp dirs (no downloads)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so spawned ranks can import test modules


def make_hf_llama(path, **kwargs):
    """random_hf_llama(**kwargs) saved with save_pretrained (safetensors) to path."""
    random_hf_llama(**kwargs).save_pretrained(path, safe_serialization=True)
    return path


def random_hf_llama(*, vocab=1001, layers=2, heads=8, kv_heads=2, hidden=64, ffn=160,
                    tie=False, rope_scaling=None, seed=0):
    """A random LlamaForCausalLM (GQA by default). Weights are scaled up from HF's 0.02 init so
    logits differ clearly between tokens and layouts (a bug cannot hide in noise)."""
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
    return randomize_(LlamaForCausalLM(config))


def randomize_(model):
    """Weights (and biases) scaled up from HF's 0.02 init, norms random around 1: logits differ
    clearly between tokens and layouts, so a bug cannot hide in noise."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model


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


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A 1000-piece Llama-style sentencepiece model trained on the demo text (well under 1 s)."""
    from megalong.data.demo_text import demo_documents
    from megalong.data.tokenizer import train_sentencepiece

    return train_sentencepiece(demo_documents("topics"), 1000, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def demo_jsonl(tmp_path_factory):
    from megalong.data.demo_text import write_demo_jsonl

    path = str(tmp_path_factory.mktemp("demo") / "topics.jsonl")
    write_demo_jsonl(path, "topics")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, demo_jsonl, sp_model):
    """The demo text as a megatron IndexedDataset prefix, tokenized with sp_model."""
    from megalong.data.preprocess import preprocess_to_indexed

    prefix = str(tmp_path_factory.mktemp("corpus") / "topics")
    preprocess_to_indexed([demo_jsonl], prefix, sp_model, progress=None)
    return prefix


@pytest.fixture(scope="session")
def tiny_megatron_ckpt(tmp_path_factory, tiny_hf_dir):
    """tiny_hf_dir converted to a megatron checkpoint (the same weights for every layout)."""
    from megalong.conversion import hf_to_megatron

    out = str(tmp_path_factory.mktemp("mc") / "tiny")
    hf_to_megatron(tiny_hf_dir, out, seq_length=64)
    return out


@pytest.fixture(scope="session")
def no_bos_tokenizer(tmp_path_factory):
    """A Qwen-style HF tokenizer directory: byte-level BPE (trained on the demo text, 400 tokens,
    so it fits the tiny model's vocabulary), `"bos_token": null`, EOS and pad <|endoftext|> —
    and a "<s>" in its vocabulary that must not be taken for a BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megalong.data.demo_text import demo_documents

    directory = tmp_path_factory.mktemp("qwen_tok")
    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(demo_documents("topics"), trainer)
    rust.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return str(directory)
