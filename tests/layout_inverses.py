"""Inverses and variants of megalong's pure layout maps that only the tests need (they check the
maps round-trip)."""

from typing import Sequence

import torch

from megalong.convert.layouts import fc1_split
from megalong.lora.merge import fuse_parts


def tp_gather(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of layouts.tp_shard over all ranks."""
    return torch.cat(list(shards), dim)


def fc1_from_shards(shards: Sequence[torch.Tensor]):
    """(gate, up) from the linear_fc1 shards of all TP ranks, in rank order."""
    halves = [fc1_split(shard) for shard in shards]
    return torch.cat([gate for gate, _ in halves]), torch.cat([up for _, up in halves])


def fuse_parts_last_dim(kind: str, parts: dict, part_rows: dict, **heads) -> torch.Tensor:
    """merge.fuse_parts on activations `[..., rows_p]` (the fused dimension last)."""
    moved = {name: t.movedim(-1, 0) for name, t in parts.items()}
    return fuse_parts(kind, moved, part_rows, **heads).movedim(0, -1)
