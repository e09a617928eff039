"""LoRA math on plain tensors (DESIGN.md §7): no modules, no process groups.

A LoRA update of a linear `y = W x` is `y = W x + s·B(A x)` with A `[r, in]`, B `[out, r]` and
scale s = alpha / r. Megatron fuses several HF linears into one (q, k and v into linear_qkv;
gate and up into linear_fc1), so a fused linear carries one (A, B) pair per HF part and the
parts' outputs are laid out in megatron's row order by `fuse_parts` — the same maps the weight
conversion uses, so a LoRA factor is exactly a PEFT factor.

Fused kinds: "qkv" (parts q, k, v), "fc1" (parts gate, up), "single" (one part).
"""

import math

import torch

from megalong.convert.layouts import qkv_hf_to_megatron
from megalong.errors import MegalongError


FUSED_PARTS = {"qkv": ("q", "k", "v"), "fc1": ("gate", "up")}


def lora_scale(rank: int, alpha: float) -> float:
    return alpha / rank


def kaiming_uniform_a(rank: int, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """A `[rank, fan_in]` as PEFT/nn.Linear initialise it (kaiming-uniform, a=sqrt(5)): U(±1/sqrt(fan_in)).
    Always drawn at full fan-in, so slicing it afterwards gives the same A at every TP size."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)


def fuse_parts(kind: str, parts: dict, part_rows: dict, *, num_heads: int = 0,
               num_kv_heads: int = 0) -> torch.Tensor:
    """Stack per-part tensors `[rows_p, ...]` into the fused linear's rows `[sum rows_p, ...]`.

    `parts` may omit some parts of a fused kind (e.g. only q and v adapted): the missing ones are
    zero rows. `part_rows` gives every part's row count; head counts are those of the rows given
    (local to a TP rank when the parts are TP shards)."""
    if kind == "single":
        (only,) = parts.values()
        return only
    present = next(iter(parts.values()))
    rest = tuple(present.shape[1:])
    full = [parts[name] if name in parts else present.new_zeros(part_rows[name], *rest)
            for name in FUSED_PARTS[kind]]
    if kind == "qkv":
        return qkv_hf_to_megatron(*full, num_heads, num_kv_heads)
    if kind == "fc1":  # megatron's fc1 (per TP rank): [gate rows; up rows]
        return torch.cat(full)
    raise MegalongError(f"unknown fused linear kind {kind!r}")


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s·B·A in float32: the change LoRA makes to a weight `[out, in]`."""
    return scale * (b.float() @ a.float())


def column_delta(kind: str, a: dict, b: dict, scale: float, part_rows: dict, **heads) -> torch.Tensor:
    """Weight change of a column-parallel shard: A replicated, B the rank's rows -> `W_r += s·B_r·A`
    per part, parts stacked in megatron's order."""
    deltas = {name: lora_delta(a[name], b[name], scale) for name in a}
    return fuse_parts(kind, deltas, part_rows, **heads)


def row_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Weight change of a row-parallel shard: A the rank's columns, B replicated -> `W_r += s·B·A_r`."""
    return lora_delta(a, b, scale)


def add_in_place(weight: torch.Tensor, delta: torch.Tensor) -> None:
    if tuple(weight.shape) != tuple(delta.shape):
        raise MegalongError(f"LoRA update of shape {tuple(delta.shape)} does not fit a weight of "
                            f"shape {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
