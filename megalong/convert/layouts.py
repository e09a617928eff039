"""HF Llama <-> megatron-core weight layouts (DESIGN.md §4): pure tensor maps, no I/O, no process groups.

Notation: nh query heads, ng kv heads (megatron's query groups), d head dim, H hidden size.
Every map works on any trailing shape (`[rows, ...]`), so LoRA B matrices `[rows, r]` and
1-D tensors go through the same functions as the weights.
"""

from typing import Callable, Iterator

import torch

from megalong.convert.hf_config import validate_tp
from megalong.errors import MegalongError
from megalong.model.arch import LlamaArch


# ---------------------------------------------------------------------------------------------
# Fused qkv: megatron keeps, per kv group g, the rows [q heads of g | k head g | v head g].


def qkv_hf_to_megatron(q, k, v, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Fuse HF q [nh*d, ...], k and v [ng*d, ...] into megatron's linear_qkv rows [(nh+2ng)*d, ...]."""
    ng = num_kv_heads
    head_dim = _head_dim(q.shape[0], num_heads, num_kv_heads, "q")
    rest = tuple(q.shape[1:])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (ng * head_dim, *rest):
            raise MegalongError(
                f"{name} has shape {tuple(t.shape)} but q {tuple(q.shape)} with {num_heads} heads "
                f"and {ng} kv heads implies {(ng * head_dim, *rest)}"
            )
    grouped = [q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)]
    return torch.cat(grouped, 1).reshape(-1, *rest)


def qkv_megatron_to_hf(qkv, num_heads: int, num_kv_heads: int):
    """Split megatron's fused linear_qkv rows back into HF (q, k, v)."""
    ng, q_per_group = num_kv_heads, num_heads // num_kv_heads
    head_dim = _head_dim(qkv.shape[0], num_heads + 2 * ng, num_kv_heads, "fused qkv")
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(ng, q_per_group + 2, head_dim, *rest)
    q = grouped[:, :q_per_group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, -2].reshape(ng * head_dim, *rest)
    v = grouped[:, -1].reshape(ng * head_dim, *rest)
    return q, k, v


def _head_dim(rows: int, row_heads: int, num_kv_heads: int, what: str) -> int:
    if num_kv_heads <= 0 or row_heads % num_kv_heads or rows % row_heads:
        raise MegalongError(
            f"{what} has {rows} rows, which does not split into {row_heads} heads of equal size "
            f"in {num_kv_heads} kv groups; check num_attention_heads/num_key_value_heads"
        )
    return rows // row_heads


# ---------------------------------------------------------------------------------------------
# Tensor-parallel shards.


def tp_shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s equal chunk of `t` along `dim` (a view)."""
    if t.shape[dim] % size:
        raise MegalongError(
            f"dimension {dim} of a tensor of shape {tuple(t.shape)} is not divisible by "
            f"tensor-parallel size {size}"
        )
    chunk = t.shape[dim] // size
    return t.narrow(dim, rank * chunk, chunk)


def fc1_shard(gate, up, rank: int, size: int) -> torch.Tensor:
    """Megatron's linear_fc1 on TP rank `rank`: [gate rows of rank; up rows of rank]."""
    return torch.cat([tp_shard(gate, 0, rank, size), tp_shard(up, 0, rank, size)])


def fc1_split(fc1: torch.Tensor):
    """(gate, up) from a TP=1 linear_fc1 = cat([gate, up])."""
    return _halve(fc1)


def _halve(t: torch.Tensor):
    if t.shape[0] % 2:
        raise MegalongError(f"linear_fc1 tensor of shape {tuple(t.shape)} has an odd row count")
    return t.chunk(2, 0)


# ---------------------------------------------------------------------------------------------
# Vocabulary padding (embedding and output layer rows).


def padded_vocab_size(vocab: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron-LM's rule: round vocab up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def pad_vocab_rows(w: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to `padded` rows."""
    if w.shape[0] > padded:
        raise MegalongError(f"vocab of {w.shape[0]} rows exceeds the padded vocab size {padded}")
    if w.shape[0] == padded:
        return w
    return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])])


def strip_vocab_rows(w: torch.Tensor, vocab: int) -> torch.Tensor:
    """Drop padding rows, keeping the first `vocab`."""
    return w[:vocab]


# ---------------------------------------------------------------------------------------------
# Whole-model maps. Megatron keys are megatron-core's local-spec GPTModel state_dict keys.


def hf_to_megatron(
    get_hf: Callable[[str], torch.Tensor],
    arch: LlamaArch,
    *,
    tp_rank: int,
    tp_size: int,
    padded_vocab: int,
    layer_range: tuple[int, int],
    pre_process: bool,
    post_process: bool,
) -> dict[str, torch.Tensor]:
    """This rank's megatron state_dict (layer indices local to the stage) from HF tensors by name.

    With tied embeddings, a last stage that does not also hold the embedding still owns an
    output_layer.weight in megatron-core; it gets the (padded, sharded) embedding.
    """
    validate_tp(arch, tp_size, 1)
    nh, ng, d, hidden = arch.num_attention_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    ffn = arch.ffn_hidden_size

    def get(name, *shape):
        t = get_hf(name)
        if tuple(t.shape) != shape:
            raise MegalongError(f"{name} has shape {tuple(t.shape)}; the config implies {shape}")
        return t

    def shard(t, dim):  # a copy when sharded, so the full tensor can be freed
        return tp_shard(t, dim, tp_rank, tp_size).clone() if tp_size > 1 else t

    def vocab_shard(name):
        return shard(pad_vocab_rows(get(name, arch.vocab_size, hidden), padded_vocab), 0)

    out = {}
    if pre_process:
        out["embedding.word_embeddings.weight"] = vocab_shard("model.embed_tokens.weight")
    start, stop = layer_range
    for i in range(start, stop):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i - start}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        qkv = qkv_hf_to_megatron(
            get(attn + "q_proj.weight", nh * d, hidden),
            get(attn + "k_proj.weight", ng * d, hidden),
            get(attn + "v_proj.weight", ng * d, hidden),
            nh,
            ng,
        )
        out[mg + "input_layernorm.weight"] = get(hf + "input_layernorm.weight", hidden)
        out[mg + "self_attention.linear_qkv.weight"] = shard(qkv, 0)
        out[mg + "self_attention.linear_proj.weight"] = shard(get(attn + "o_proj.weight", hidden, nh * d), 1)
        out[mg + "pre_mlp_layernorm.weight"] = get(hf + "post_attention_layernorm.weight", hidden)
        out[mg + "mlp.linear_fc1.weight"] = fc1_shard(
            get(mlp + "gate_proj.weight", ffn, hidden), get(mlp + "up_proj.weight", ffn, hidden), tp_rank, tp_size
        )
        out[mg + "mlp.linear_fc2.weight"] = shard(get(mlp + "down_proj.weight", hidden, ffn), 1)
    if post_process:
        out["decoder.final_layernorm.weight"] = get("model.norm.weight", hidden)
        if not arch.tie_word_embeddings:
            out["output_layer.weight"] = vocab_shard("lm_head.weight")
        elif not pre_process:
            out["output_layer.weight"] = vocab_shard("model.embed_tokens.weight")
    return out


def megatron_to_hf(
    get_megatron: Callable[[str], torch.Tensor], arch: LlamaArch, *, padded_vocab: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF (name, tensor) one at a time, in HF's order, from full (TP=1, global-layer) tensors."""
    nh, ng = arch.num_attention_heads, arch.num_kv_heads

    def unpadded(key):
        t = get_megatron(key)
        if t.shape[0] != padded_vocab:
            raise MegalongError(f"{key} has {t.shape[0]} rows; expected the padded vocab size {padded_vocab}")
        return strip_vocab_rows(t, arch.vocab_size)

    yield "model.embed_tokens.weight", unpadded("embedding.word_embeddings.weight")
    for i in range(arch.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = qkv_megatron_to_hf(get_megatron(mg + "self_attention.linear_qkv.weight"), nh, ng)
        yield hf + "self_attn.q_proj.weight", q
        yield hf + "self_attn.k_proj.weight", k
        yield hf + "self_attn.v_proj.weight", v
        yield hf + "self_attn.o_proj.weight", get_megatron(mg + "self_attention.linear_proj.weight")
        gate, up = fc1_split(get_megatron(mg + "mlp.linear_fc1.weight"))
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        yield hf + "mlp.down_proj.weight", get_megatron(mg + "mlp.linear_fc2.weight")
        yield hf + "input_layernorm.weight", get_megatron(mg + "input_layernorm.weight")
        yield hf + "post_attention_layernorm.weight", get_megatron(mg + "pre_mlp_layernorm.weight")
    yield "model.norm.weight", get_megatron("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", unpadded("output_layer.weight")


# ---------------------------------------------------------------------------------------------
# Local-spec <-> Transformer-Engine-spec key names (TE fuses the norms into the next linear).

_LOCAL_TO_TE_SUFFIX = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}
_TE_TO_LOCAL_SUFFIX = {te: local for local, te in _LOCAL_TO_TE_SUFFIX.items()}


def local_to_te_key(key: str) -> str:
    """decoder.layers.{j}.input_layernorm.weight -> ...self_attention.linear_qkv.layer_norm_weight, etc."""
    return _swap_suffix(key, _LOCAL_TO_TE_SUFFIX)


def te_to_local_key(key: str) -> str:
    """Inverse of local_to_te_key; other keys pass through unchanged."""
    return _swap_suffix(key, _TE_TO_LOCAL_SUFFIX)


def _swap_suffix(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key
