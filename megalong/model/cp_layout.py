"""Contiguous context-parallel layout (DESIGN.md §6): CP rank r holds tokens [rL, (r+1)L).

megatron-core lays sequences out zig-zag for its ring attention (2c chunks, rank r holding
chunks r and 2c-1-r) in two places; S²-Attn's groups cost the same wherever they lie, so
contiguous slices are balanced already and need only a half-group halo (attention/
context_parallel.py). The two places, replaced here:
- batch slicing (megatron-LM's `get_batch_on_this_cp_rank`, not called by megalong):
  `slice_batch_for_cp_rank`, used by model/forward.py on every micro-batch;
- RoPE slicing (`get_pos_emb_on_this_cp_rank`, called inside megatron's RotaryEmbedding and
  YarnRotaryEmbedding): `contiguous_rotary_embedding(model, ...)` builds the model's rotary
  embedding again as `ContiguousRotaryEmbedding` (or `ContiguousYarnRotaryEmbedding`, whose
  forward returns megatron's `(emb, mscale)`), whose forward slices contiguously; build_llama
  puts it in the model. megatron's function stays as it is for other models in the process.
Labels are shifted before slicing (datasets give labels[i] = tokens[i+1]), so no token pair
crosses a slice boundary.
"""

from functools import lru_cache

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

from megalong.errors import MegalongError


# Per-token fields of a micro-batch, [b, s] each.
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def cp_rank_and_size(group=None) -> tuple[int, int]:
    if group is None:
        if not parallel_state.model_parallel_is_initialized():
            return 0, 1
        group = parallel_state.get_context_parallel_group()
    return dist.get_rank(group), dist.get_world_size(group)


def local_span(seq_len: int, cp_rank: int, cp_size: int) -> slice:
    """Tokens [rL, (r+1)L) of CP rank r."""
    if seq_len % cp_size:
        raise MegalongError(f"sequence length {seq_len} does not split into {cp_size} "
                            "context-parallel slices; use a length divisible by the "
                            "context-parallel size")
    length = seq_len // cp_size
    return slice(cp_rank * length, (cp_rank + 1) * length)


def slice_batch_for_cp_rank(batch: dict, group=None) -> dict:
    """This CP rank's contiguous share of a micro-batch ([b, s] fields; others unchanged)."""
    rank, size = cp_rank_and_size(group)
    if size == 1:
        return batch
    span = local_span(batch["tokens"].shape[1], rank, size)
    return {key: value[:, span] if key in SEQUENCE_KEYS and value is not None else value
            for key, value in batch.items()}


def gather_sequence_over_cp(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Inverse of the contiguous slicing for outputs (no gradient): concatenate the CP ranks'
    slices of x along `dim`."""
    rank, size = cp_rank_and_size(group)
    if size == 1:
        return x
    group = group or parallel_state.get_context_parallel_group()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class ContiguousRotaryEmbedding(RotaryEmbedding):
    """megatron's RotaryEmbedding whose CP slice is rank r's contiguous [rL, (r+1)L) instead of
    the zig-zag chunks of `get_pos_emb_on_this_cp_rank`. Same state, same other methods."""

    @lru_cache(maxsize=32)
    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None) -> torch.Tensor:
        emb = self.get_emb(max_seq_len, offset)  # [N, 1, 1, d] for every position
        group = self.cp_group if cp_group is None else cp_group
        if group is None or group.size() == 1 or packed_seq:
            return emb
        return emb[local_span(max_seq_len, group.rank(), group.size())]


class ContiguousYarnRotaryEmbedding(YarnRotaryEmbedding):
    """megatron's YarnRotaryEmbedding whose CP slice is rank r's contiguous [rL, (r+1)L);
    its forward returns megatron's (emb, mscale) (GPTModel keeps emb; attention takes the
    mscale from the config)."""

    @lru_cache(maxsize=32)
    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None):
        emb, mscale = self.get_emb(max_seq_len, offset)
        group = self.cp_group if cp_group is None else cp_group
        if group is None or group.size() == 1 or packed_seq:
            return emb, mscale
        return emb[local_span(max_seq_len, group.rank(), group.size())], mscale

    def _set_cos_sin_cache(self, seq_len, offset, dtype, packed_seq=False):
        """megatron's cos/sin cache (for its inference paths), over every position: built at
        __init__ for the original length, which need not split into CP slices."""
        self.max_seq_len_cached, self.offset_cached = seq_len, offset
        self.dtype_cached, self.packed_seq_cached = dtype, packed_seq
        emb, mscale = self.get_emb(seq_len, offset)
        self.register_buffer("cos_cached", (emb.cos() * mscale).to(dtype).contiguous(),
                             persistent=False)
        self.register_buffer("sin_cached", (emb.sin() * mscale).to(dtype).contiguous(),
                             persistent=False)


def contiguous_rotary_embedding(model: torch.nn.Module, **rope_args) -> RotaryEmbedding:
    """`model.rotary_pos_emb` (a GPTModel's RotaryEmbedding or YarnRotaryEmbedding) as a
    ContiguousRotaryEmbedding (ContiguousYarnRotaryEmbedding): built with the arguments
    GPTModel.__init__ gave it (its rotary_* and rope_* arguments are `rope_args`; YaRN's come
    from the config's yarn_* attributes, as GPTModel reads them), so the same state (inv_freq,
    cp_group, interpolation); only forward differs."""
    rope = model.rotary_pos_emb
    config = model.config
    common = dict(kv_channels=config.kv_channels, rotary_interleaved=config.rotary_interleaved,
                  use_cpu_initialization=config.use_cpu_initialization,
                  cp_group=model.pg_collection.cp)
    if type(rope) is RotaryEmbedding:
        contiguous = ContiguousRotaryEmbedding(**common, **rope_args)
        same = torch.equal(contiguous.inv_freq, rope.inv_freq)
    elif type(rope) is YarnRotaryEmbedding:
        contiguous = ContiguousYarnRotaryEmbedding(
            **common, **rope_args,
            scaling_factor=config.yarn_rotary_scaling_factor,
            original_max_position_embeddings=config.yarn_original_max_position_embeddings,
            beta_fast=config.yarn_beta_fast, beta_slow=config.yarn_beta_slow,
            mscale=config.yarn_mscale, mscale_all_dim=config.yarn_mscale_all_dim,
            correction_range_round_to_int=config.yarn_correction_range_round_to_int)
        same = all(torch.equal(getattr(contiguous, name), getattr(rope, name))
                   for name in ("inv_freq", "inv_freq_extra", "inv_freq_inter")) and all(
            getattr(contiguous, name) == getattr(rope, name)
            for name in ("scaling_factor", "original_max_position_embeddings", "beta_fast",
                         "beta_slow", "mscale", "mscale_all_dim",
                         "correction_range_round_to_int"))
    else:
        raise MegalongError(f"context parallel S²-Attn supports megatron's RotaryEmbedding and "
                            f"YarnRotaryEmbedding, not {type(rope).__name__}")
    if not (same and contiguous.cp_group is rope.cp_group
            and contiguous.__dict__.keys() == rope.__dict__.keys()):
        raise MegalongError(f"{type(contiguous).__name__} differs from the {type(rope).__name__} "
                            "megatron built (model/cp_layout.py: GPTModel's arguments changed?)")
    return contiguous
