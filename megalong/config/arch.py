"""Llama-family architecture descriptions (torch-free, so CLIs can validate before importing torch)."""

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from megalong.errors import MegalongError


VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's --make-vocab-size-divisible-by default


@dataclass(frozen=True)
class Family:
    """A decoder family megalong converts: Llama's layout plus the features named here (the
    weight map's conditional entries and TransformerConfig's switches read them)."""

    model_type: str  # config.json's model_type
    architecture: str  # config.json's architectures entry (the transformers class)
    qkv_bias: bool = False  # q/k/v projections have biases (megatron's add_qkv_bias)
    qk_layernorm: bool = False  # per-head RMSNorm on q and k before RoPE (megatron's qk_layernorm)
    default_head_dim: Optional[int] = None  # transformers' head_dim when config.json has none
    default_sliding_window: Optional[int] = None  # transformers' default sliding_window


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM"),
        Family("mistral", "MistralForCausalLM", default_sliding_window=4096),
        Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
        Family("qwen3", "Qwen3ForCausalLM", qk_layernorm=True, default_head_dim=128),
    )
}


@dataclass(frozen=True)
class LlamaArch:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    # The length the base model was trained at; interpolation factors are relative to it.
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # Llama-3.x frequency-dependent RoPE scaling ("llama3" rope type); None for plain RoPE.
    llama3_rope: Optional[dict] = field(default=None, hash=False, compare=False)
    # YaRN scaling (transformers' "yarn" rope parameters, config/yarn.py); None without it.
    yarn_rope: Optional[dict] = field(default=None, hash=False)
    head_dim_override: Optional[int] = None
    family: str = "llama"  # a FAMILIES key (config.json's model_type)
    # Sliding-window attention in effect (transformers' decision for the config), or None. Only
    # lengths up to it are supported (check_sliding_window): megalong's attention is full causal.
    sliding_window: Optional[int] = None

    @property
    def qkv_bias(self) -> bool:
        return FAMILIES[self.family].qkv_bias

    @property
    def qk_layernorm(self) -> bool:
        return FAMILIES[self.family].qk_layernorm

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        """Rows of the query projection (nh * d)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Rows of the key projection, and of the value projection (ng * d)."""
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        """Rows of megatron's fused linear_qkv ((nh + 2 ng) * d)."""
        return self.q_size + 2 * self.kv_size

    def check_sliding_window(self, length: int, what: str = "sequence length") -> None:
        """Refuse lengths the config's sliding-window attention would mask differently from the
        full causal attention megalong computes (equal up to the window)."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise MegalongError(
                f"sliding_window {self.sliding_window} is in effect for this {self.family} config and "
                f"the {what} {length} exceeds it; megalong computes full causal attention only: "
                f"supported are sliding_window null or >= the length")

    def dim(self, name: str) -> int:
        """A named size (the weight map's shapes are tuples of these names): hidden_size,
        ffn_hidden_size, vocab_size, q_size, kv_size, qkv_size, head_dim."""
        if name not in DIM_NAMES:
            raise KeyError(f"unknown dimension {name!r}; known: {', '.join(DIM_NAMES)}")
        return getattr(self, name)

    def padded_vocab(self, divisible_by: int = VOCAB_DIVISIBLE_BY, tp: int = 1) -> int:
        """The embedding's and output layer's row count (padded_vocab_size's rule)."""
        return padded_vocab_size(self.vocab_size, divisible_by, tp)

    def with_(self, **changes) -> "LlamaArch":
        return replace(self, **changes)


DIM_NAMES = ("hidden_size", "ffn_hidden_size", "vocab_size", "q_size", "kv_size", "qkv_size", "head_dim")


def padded_vocab_size(vocab: int, divisible_by: int = VOCAB_DIVISIBLE_BY, tp: int = 1) -> int:
    """Megatron-LM's rule (--make-vocab-size-divisible-by): round vocab up to a multiple of
    divisible_by * tp, so every TP rank holds an equal share of the embedding and lm_head."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def validate_tp(arch: LlamaArch, tp: int, pp: int) -> None:
    """Raise MegalongError unless the model splits over tensor-parallel `tp` and pipeline-parallel `pp`."""
    tp_dims = {
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "intermediate_size": arch.ffn_hidden_size,
    }
    bad = {name: n for name, n in tp_dims.items() if tp < 1 or n % tp}
    if bad:
        common = math.gcd(*tp_dims.values())
        valid = [t for t in range(1, common + 1) if common % t == 0]
        numbers = ", ".join(f"{name} {n}" for name, n in bad.items())
        raise MegalongError(f"tensor-model-parallel-size {tp} does not divide {numbers}; use one of {valid}")
    if pp < 1 or arch.num_layers % pp:
        valid = [p for p in range(1, arch.num_layers + 1) if arch.num_layers % p == 0]
        raise MegalongError(
            f"pipeline-model-parallel-size {pp} does not divide num_hidden_layers {arch.num_layers}; use one of {valid}"
        )


PRESETS = {
    "llama2-7b": LlamaArch(4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": LlamaArch(5120, 40, 40, 40, 13824, 32000),
    "llama2-70b": LlamaArch(8192, 80, 64, 8, 28672, 32000),
    # Mistral-7B-v0.3 (sliding_window null), Qwen2.5-7B, Qwen3-8B.
    "mistral-7b": LlamaArch(4096, 32, 32, 8, 14336, 32768, max_position_embeddings=32768,
                            rope_theta=1e6, family="mistral"),
    "qwen2.5-7b": LlamaArch(3584, 28, 28, 4, 18944, 152064, max_position_embeddings=32768,
                            rope_theta=1e6, norm_eps=1e-6, family="qwen2"),
    "qwen3-8b": LlamaArch(4096, 36, 32, 8, 12288, 151936, max_position_embeddings=40960,
                          rope_theta=1e6, norm_eps=1e-6, family="qwen3"),
    # Tiny presets for tests and the CPU demo: GQA, vocab not divisible by 2.
    "tiny": LlamaArch(128, 4, 8, 4, 256, 1001, max_position_embeddings=256),
    "tiny-mha": LlamaArch(64, 2, 4, 4, 160, 999, max_position_embeddings=128),
    # The attention-pattern ablation's base model (examples/ablation_patterns.sh): 3.4 M
    # parameters, 256 tokens of context.
    "mini": LlamaArch(256, 4, 8, 4, 704, 1001, max_position_embeddings=256),
}
