"""HF Llama <-> megatron-core weight layouts (DESIGN.md §4): pure tensor maps, no I/O, no process groups.

Notation: nh query heads, ng kv heads (megatron's query groups), d head dim, H hidden size.
Every map works on any trailing shape (`[rows, ...]`), so LoRA B matrices `[rows, r]` and
1-D tensors go through the same functions as the weights.
"""

from typing import Callable, Iterator

import torch

from megalong.config import weight_map
from megalong.config.arch import LlamaArch, validate_tp
from megalong.config.weight_map import at
from megalong.errors import MegalongError


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
# Vocabulary padding (embedding and output layer rows). The size rule is the architecture's.


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
# Whole-model maps: the weight map's entries (megalong/config/weight_map.py) through the functions
# above, by kind. Megatron keys are megatron-core's local-spec GPTModel state_dict keys.


def _to_megatron(mapping: weight_map.Mapping, tensors, arch: LlamaArch, tp_rank: int, tp_size: int,
                 padded_vocab: int) -> torch.Tensor:
    """One megatron parameter's shard on TP rank `tp_rank` from its HF tensors."""

    def shard(t, dim):  # a copy when sharded, so the full tensor can be freed
        return tp_shard(t, dim, tp_rank, tp_size).clone() if tp_size > 1 else t

    kind = mapping.kind
    if kind == weight_map.QKV:
        return shard(qkv_hf_to_megatron(*tensors, arch.num_attention_heads, arch.num_kv_heads), 0)
    if kind == weight_map.GATED_MLP:
        return fc1_shard(*tensors, tp_rank, tp_size)
    (tensor,) = tensors
    if kind == weight_map.VOCAB:
        tensor = pad_vocab_rows(tensor, padded_vocab)
    elif kind != weight_map.ONE_TO_ONE:
        raise MegalongError(f"unknown weight map kind {kind!r}")
    return tensor if mapping.tp_dim is None else shard(tensor, mapping.tp_dim)


def _to_hf(mapping: weight_map.Mapping, key: str, tensor: torch.Tensor, arch: LlamaArch,
           padded_vocab: int) -> tuple:
    """A full (TP=1) megatron parameter's HF tensors, in the mapping's order."""
    kind = mapping.kind
    if kind == weight_map.QKV:
        return qkv_megatron_to_hf(tensor, arch.num_attention_heads, arch.num_kv_heads)
    if kind == weight_map.GATED_MLP:
        return fc1_split(tensor)
    if kind == weight_map.VOCAB:
        if tensor.shape[0] != padded_vocab:
            raise MegalongError(f"{key} has {tensor.shape[0]} rows; expected the padded vocab size "
                                f"{padded_vocab}")
        return (strip_vocab_rows(tensor, arch.vocab_size),)
    return (tensor,)


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
    start = layer_range[0]

    def get(name, tensor_spec):
        t = get_hf(name)
        shape = weight_map.hf_shape(tensor_spec, arch)
        if tuple(t.shape) != shape:
            raise MegalongError(f"{name} has shape {tuple(t.shape)}; the config implies {shape}")
        return t

    out = {}
    for mapping, layer in weight_map.placed(arch, range(*layer_range), pre_process=pre_process,
                                            post_process=post_process):
        names = weight_map.hf_names(mapping, arch)
        tensors = [get(at(name, layer), spec) for name, spec in zip(names, mapping.hf)]
        key = at(mapping.megatron, None if layer is None else layer - start)
        out[key] = _to_megatron(mapping, tensors, arch, tp_rank, tp_size, padded_vocab)
    return out


def megatron_to_hf(
    get_megatron: Callable[[str], torch.Tensor], arch: LlamaArch, *, padded_vocab: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF (name, tensor) one at a time, in HF's order, from full (TP=1, global-layer) tensors."""
    for mapping, layer in weight_map.placed(arch, range(arch.num_layers)):
        key = at(mapping.megatron, layer)
        tensors = _to_hf(mapping, key, get_megatron(key), arch, padded_vocab)
        for spec, tensor in zip(mapping.hf, tensors):
            yield at(spec.name, layer), tensor


# ---------------------------------------------------------------------------------------------
# Local-spec <-> Transformer-Engine-spec key names (the weight map's TE aliases).

local_to_te_key = weight_map.te_key
te_to_local_key = weight_map.local_key
