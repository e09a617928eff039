"""LoRA adapters for megatron-core's tensor-parallel linears (DESIGN.md §7).

An adapter is attached by composition: a forward hook on the base linear adds `s·B(A x)` to the
base output, and the adapter module sits next to the base linear in the layer
(`self_attention.linear_qkv` gets `self_attention.linear_qkv_lora`), so the base weights keep their
checkpoint keys and the adapter's factors carry their own TP sharding into dist checkpoints.

Gradient reductions (the base linear does its own; these are the adapter's):
- ColumnParallelLinear base (x replicated over TP, or sequence-split under SP): A is replicated,
  each part's B holds the rank's output rows.
  No SP: `copy_to_tensor_model_parallel_region` on A x — its backward sums dL/d(Ax) over TP, so
  A's gradient (and the adapter's dX) is complete on every rank. (Applied to x instead, dX would
  be complete but A's gradient would only hold the rank's own output rows.)
  SP: A x_local, then `gather_from_sequence_parallel_region` (backward: reduce-scatter); A's
  gradient covers the rank's tokens only, so A is tagged `sequence_parallel` and
  finalize_model_grads sums it over TP.
- RowParallelLinear base (x split along its input): A holds the rank's input columns; the r-wide
  partial products are summed with `reduce_from_tensor_model_parallel_region` (SP:
  `reduce_scatter_to_sequence_parallel_region`, and B, which then sees the rank's tokens only, is
  tagged `sequence_parallel`); B is replicated.
Dropout: on the default generator where x is replicated over TP (the same mask on every rank),
on megatron's tensor-parallel RNG stream where x is split.
"""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from megalong.config import weight_map
from megalong.errors import MegalongError
from megalong.lora.merge import fuse_parts, lora_scale


COLUMN_LINEARS = tuple(linear for linear, m in weight_map.LINEARS.items() if m.tp_dim == 0)
ADAPTER_SUFFIX = "_lora"


class LoRAFactors(torch.nn.Module):
    """One HF linear's low-rank pair on this rank: A `[r, in_local]`, B `[out_local, r]`."""

    def __init__(self, a_shape, b_shape, dtype, device):
        super().__init__()
        self.A = torch.nn.Parameter(torch.zeros(*a_shape, dtype=dtype, device=device))
        self.B = torch.nn.Parameter(torch.zeros(*b_shape, dtype=dtype, device=device))
        self.B.lora_b = True  # LoRA+ (--lora-b-lr-ratio) selects B by this attribute


class LoRAAdapter(torch.nn.Module):
    """The LoRA update of one megatron linear (column or row parallel), one part per HF linear.

    parts: {part name: (in_features, out_features)} of the *full* (unsharded) HF linear.
    fused: "qkv", "fc1" or "single" (how the column parts' rows interleave, see merge.py)."""

    def __init__(self, base: torch.nn.Module, *, parallel: str, parts: dict, fused: str, rank: int,
                 alpha: float, dropout: float, config, all_part_rows: dict, heads=(0, 0)):
        super().__init__()
        if parallel not in ("column", "row"):
            raise MegalongError(f"unknown linear kind {parallel!r}")
        self.parallel, self.fused, self.rank, self.alpha = parallel, fused, rank, alpha
        self.scale = lora_scale(rank, alpha)
        self.dropout = dropout
        self.sequence_parallel = bool(config.sequence_parallel)
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.part_names = list(parts)
        self.full_shapes = dict(parts)  # part -> (in, out), unsharded
        # Local row count of every part of the fused kind (missing parts are zero rows).
        self.local_rows = {name: rows // self.tp_size for name, rows in all_part_rows.items()}
        self.local_heads = {"num_heads": heads[0] // self.tp_size,
                            "num_kv_heads": heads[1] // self.tp_size}
        dtype, device = base.weight.dtype, base.weight.device
        for name, (fan_in, fan_out) in parts.items():
            if parallel == "column":
                factors = LoRAFactors((rank, fan_in), (fan_out // self.tp_size, rank), dtype, device)
                set_tensor_model_parallel_attributes(factors.B, True, 0, 1)
                factors.A.sequence_parallel = self.sequence_parallel
            else:
                factors = LoRAFactors((rank, fan_in // self.tp_size), (fan_out, rank), dtype, device)
                set_tensor_model_parallel_attributes(factors.A, True, 1, 1)
                factors.B.sequence_parallel = self.sequence_parallel
            self.add_module(name, factors)
        self._check_fits(base)
        self.base_kind = "te_layernorm" if hasattr(base, "layer_norm_weight") else "plain"
        self._hook = None

    def factors(self):
        return [(name, getattr(self, name)) for name in self.part_names]

    def _check_fits(self, base):
        weight_shape = tuple(base.weight.shape)
        if self.parallel == "column":
            rows = sum(self.local_rows.values())
            fan_ins = {fan_in for fan_in, _ in self.full_shapes.values()}
            expected = (rows, *fan_ins)
        else:
            ((fan_in, fan_out),) = self.full_shapes.values()
            expected = (fan_out, fan_in // self.tp_size)
        if weight_shape != expected:
            raise MegalongError(f"LoRA adapter for a {expected} weight does not fit the base "
                                f"linear's weight of shape {weight_shape}")

    # ------------------------------------------------------------------------------- forward

    def _dropout(self, x, replicated: bool):
        if not self.training or self.dropout == 0.0:
            return x
        if replicated:
            return F.dropout(x, self.dropout, training=True)
        with get_cuda_rng_tracker().fork():
            return F.dropout(x, self.dropout, training=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update to add to the base output; x is the base linear's input."""
        hidden, weight = self.low_rank(x)
        return F.linear(hidden, weight)

    def low_rank(self, x: torch.Tensor):
        """(h, W) with update = h W^T: h `[s, b, parts*r]` the stacked A x (reduced over TP as the
        base linear's layout needs), W `[out_local, parts*r]` every part's s·B in one matrix."""
        if self.parallel == "row":
            return self._row_low_rank(x)
        return self._column_low_rank(x)

    def _column_low_rank(self, x):
        x = self._dropout(x, replicated=not self.sequence_parallel)
        stacked_a = torch.cat([factors.A for _, factors in self.factors()])
        hidden = F.linear(x, stacked_a)  # [s(/tp), b, parts*r]
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, group=self.tp_group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        return hidden, self.fused_b()

    def fused_b(self) -> torch.Tensor:
        """s·B of every part as one `[out_local, parts*r]` matrix in megatron's row order: part i's
        rows hold its B in columns [i*r, (i+1)*r) and zeros elsewhere. One matmul with it gives
        the parts' updates already interleaved (qkv) or stacked (fc1): no activation-sized
        concatenation, scaling or per-part outputs (weight-sized work only)."""
        count, r = len(self.part_names), self.rank
        blocks = {name: F.pad(self.scale * factors.B, (i * r, (count - 1 - i) * r))
                  for i, (name, factors) in enumerate(self.factors())}
        return fuse_parts(self.fused, blocks, self.local_rows, **self.local_heads)

    def _row_low_rank(self, x):
        ((_, factors),) = self.factors()
        x = self._dropout(x, replicated=self.tp_size == 1)
        partial = F.linear(x, factors.A)  # [s, b, r], this rank's input columns only
        if self.sequence_parallel:
            hidden = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        else:
            hidden = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        return hidden, self.scale * factors.B

    def attach(self, base: torch.nn.Module) -> None:
        """Add this adapter's update to every output of `base`."""
        if self._hook is not None:
            raise MegalongError("LoRA adapter is already attached")

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["input_"]
            if self.base_kind == "te_layernorm":  # TE fuses the pre-norm into the linear
                x = _te_input_norm(module, x)
            out, bias = output
            hidden, weight = self.low_rank(x)
            return _add_low_rank(out, hidden.to(out.dtype), weight.to(out.dtype)), bias

        self._hook = base.register_forward_hook(hook, with_kwargs=True)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------------------- checkpoints

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """TP-split factors as ShardedTensors split on their TP axis (column B on 0, row A on 1),
        the replicated ones replicated: a checkpoint saved at one TP loads at any other."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        split = "B" if self.parallel == "column" else "A"
        axis = 0 if self.parallel == "column" else 1
        axis_map = {f"{name}.{split}": axis for name in self.part_names}
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis_map, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )

    def extra_repr(self) -> str:
        return (f"{self.parallel}, parts={self.part_names}, r={self.rank}, alpha={self.alpha}, "
                f"dropout={self.dropout}, TP={self.tp_size}, SP={self.sequence_parallel}")


def _add_low_rank(out, hidden, weight):
    """out + hidden @ weight^T in one addmm (no separate update tensor, no extra add pass)."""
    if not out.is_contiguous():
        return out + F.linear(hidden, weight)
    rows = out.shape[-1]
    flat = torch.addmm(out.reshape(-1, rows), hidden.reshape(-1, hidden.shape[-1]), weight.t())
    return flat.view(out.shape)


def _te_input_norm(module, x):
    """The norm TE's LayerNormLinear applies before its matmul (GPU path; not tested on CPU)."""
    weight = module.layer_norm_weight
    if getattr(module, "zero_centered_gamma", False):
        weight = weight + 1
    if getattr(module, "normalization", "RMSNorm") != "RMSNorm":
        raise MegalongError("LoRA on a fused LayerNorm linear supports RMSNorm only")
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.eps)
    return (weight.float() * normed).to(x.dtype)
