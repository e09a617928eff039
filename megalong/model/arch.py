"""Llama-family architecture descriptions (torch-free, so CLIs can validate before importing torch)."""

from dataclasses import dataclass, field, replace
from typing import Optional


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
    head_dim_override: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    def with_(self, **changes) -> "LlamaArch":
        return replace(self, **changes)


PRESETS = {
    "llama2-7b": LlamaArch(4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": LlamaArch(5120, 40, 40, 40, 13824, 32000),
    "llama2-70b": LlamaArch(8192, 80, 64, 8, 28672, 32000),
    # Tiny presets for tests and the CPU demo: GQA, vocab not divisible by 2.
    "tiny": LlamaArch(128, 4, 8, 4, 256, 1001, max_position_embeddings=256),
    "tiny-mha": LlamaArch(64, 2, 4, 4, 160, 999, max_position_embeddings=128),
}
