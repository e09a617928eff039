"""Add LoRA adapters to a built model, choose what trains, merge (DESIGN.md §7).

Order of use (before megatron DDP wraps the model):
    add_lora(model, LoraOptions(...))            # adapters into the targeted linears, A random, B zero
    set_trainable(model, ("embed", "norm"))      # adapters + extras train, everything else frozen
    print(describe_trainable(model))             # collective: trainable vs total parameters
Export: merge_lora(model) folds the adapters into the base weights shard by shard and removes them.
"""

import torch

from megalong.config import weight_map
from megalong.config.arch import LlamaArch
from megalong.config.lora import (PART_ORDER, TRAINABLE_EXTRAS, LoraConfig, LoraOptions,
                                  lora_metadata, validate_trainable)
from megalong.config.weight_map import PART_TO_LINEAR
from megalong.convert.layouts import tp_shard
from megalong.errors import MegalongError
from megalong.lora.adapters import ADAPTER_SUFFIX, COLUMN_LINEARS, LoRAAdapter
from megalong.lora.merge import add_in_place, column_delta, kaiming_uniform_a, row_delta
from megalong.runtime import device


# The adapted linears' parent modules and how their parts' rows interleave (merge.py's names for
# the weight map's kinds).
LINEAR_PARENT = {linear: weight_map.linear_parent(linear) for linear in weight_map.LINEARS}
_FUSED_NAME = {weight_map.QKV: "qkv", weight_map.GATED_MLP: "fc1", weight_map.ONE_TO_ONE: "single"}
LINEAR_FUSED = {linear: _FUSED_NAME[m.kind] for linear, m in weight_map.LINEARS.items()}


# ---------------------------------------------------------------------------------- adapters


def _linear_geometry(config, linear: str):
    """{part: (in, out)} of the full HF linears inside megatron's `linear` (the weight map's
    shapes for the model's TransformerConfig), plus (nh, ng)."""
    arch = LlamaArch(hidden_size=config.hidden_size, num_layers=config.num_layers,
                     num_attention_heads=config.num_attention_heads,
                     num_kv_heads=config.num_query_groups, ffn_hidden_size=config.ffn_hidden_size,
                     vocab_size=0, head_dim_override=config.kv_channels)
    shapes = weight_map.linear_shapes(arch)
    return ({part: shapes[part] for part in weight_map.LINEARS[linear].parts},
            (arch.num_attention_heads, arch.num_kv_heads))


def iter_adapters(model):
    """(global layer index, megatron linear name, parent module, adapter) for every adapter."""
    for layer in model.decoder.layers:
        for linear, parent_name in LINEAR_PARENT.items():
            parent = getattr(layer, parent_name)
            adapter = getattr(parent, linear + ADAPTER_SUFFIX, None)
            if adapter is not None:
                yield layer.layer_number - 1, linear, parent, adapter


def add_lora(model, options: LoraOptions) -> int:
    """Adapters on every targeted linear of this rank's layers; returns how many were added.
    A is initialised (layout-independently, see init_lora), B is zero."""
    unknown = [p for p in options.parts if p not in PART_TO_LINEAR]
    if unknown or not options.parts:
        raise MegalongError(f"unknown LoRA part(s) {unknown or '(none given)'}; valid: "
                            f"{', '.join(PART_ORDER)}")
    if options.rank < 1 or options.alpha <= 0 or not 0.0 <= options.dropout < 1.0:
        raise MegalongError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank "
                            f"{options.rank}, alpha {options.alpha}, dropout {options.dropout}")
    if any(True for _ in iter_adapters(model)):
        raise MegalongError("the model already has LoRA adapters")
    config = model.config
    added = 0
    for layer in model.decoder.layers:
        for linear, parent_name in LINEAR_PARENT.items():
            wanted = [p for p in options.parts if PART_TO_LINEAR[p] == linear]
            if not wanted:
                continue
            parent = getattr(layer, parent_name)
            base = getattr(parent, linear)
            geometry, heads = _linear_geometry(config, linear)
            adapter = LoRAAdapter(
                base, parallel="column" if linear in COLUMN_LINEARS else "row",
                parts={p: geometry[p] for p in wanted}, fused=LINEAR_FUSED[linear],
                rank=options.rank, alpha=options.alpha, dropout=options.dropout, config=config,
                all_part_rows={p: out for p, (_, out) in geometry.items()}, heads=heads,
            )
            adapter.train(base.training)  # a new module is in training mode; follow the model's
            parent.add_module(linear + ADAPTER_SUFFIX, adapter)
            adapter.attach(base)
            added += 1
    init_lora(model, options.init_seed)
    return added


def _generator(seed: int, layer_index: int, part: str, which: str) -> torch.Generator:
    code = PART_ORDER.index(part) * 2 + (which == "B")
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_index * 64 + code)


def init_lora(model, seed: int, *, b_std: float = 0.0) -> None:
    """A kaiming-uniform over its full fan-in, B zero (or N(0, b_std²), for tests), each drawn
    whole from a generator keyed by (seed, global layer, part) and then sliced to this rank's
    shard: the same adapter at every TP/PP layout."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for layer_index, _, _, adapter in iter_adapters(model):
            for part, factors in adapter.factors():
                fan_in, fan_out = adapter.full_shapes[part]
                a = kaiming_uniform_a(adapter.rank, fan_in, _generator(seed, layer_index, part, "A"))
                b = torch.zeros(fan_out, adapter.rank)
                if b_std:
                    b.normal_(0.0, b_std, generator=_generator(seed, layer_index, part, "B"))
                if adapter.parallel == "column":
                    b = tp_shard(b, 0, tp_rank, tp_size)
                else:
                    a = tp_shard(a, 1, tp_rank, tp_size)
                factors.A.copy_(a)
                factors.B.copy_(b)


def merge_lora(model) -> int:
    """Fold every adapter into its base weight on this rank (column `W_r += s·B_r·A`, row
    `W_r += s·B·A_r`; no communication) and remove the adapters. Returns how many were merged."""
    merged = 0
    for _, linear, parent, adapter in list(iter_adapters(model)):
        base = getattr(parent, linear)
        # float32 factors: in a bf16 model B·A would otherwise be rounded before the add.
        if adapter.parallel == "column":
            delta = column_delta(
                adapter.fused, {p: f.A.float() for p, f in adapter.factors()},
                {p: f.B.float() for p, f in adapter.factors()}, adapter.scale,
                adapter.local_rows, **adapter.local_heads)
        else:
            ((_, factors),) = adapter.factors()
            delta = row_delta(factors.A.float(), factors.B.float(), adapter.scale)
        add_in_place(base.weight, delta)
        adapter.detach()
        delattr(parent, linear + ADAPTER_SUFFIX)
        merged += 1
    return merged


# ---------------------------------------------------------------------------------- what trains


def is_adapter_param(name: str) -> bool:
    return f"{ADAPTER_SUFFIX}." in name


def is_norm_param(name: str) -> bool:
    # Local spec: input_layernorm / pre_mlp_layernorm / final_layernorm; TE: fused layer_norm_weight.
    return name.endswith("layernorm.weight") or name.endswith("layer_norm_weight")


def set_trainable(model, extras=TRAINABLE_EXTRAS, *, full_finetune: bool = False) -> None:
    """requires_grad for adapters plus `extras` (embed: the input embedding; norm: every RMSNorm,
    the final one included); everything else, lm_head included, is frozen. With tied embeddings
    the lm_head is the embedding and trains with it. Call before wrapping the model in DDP."""
    from megatron.core.distributed import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise MegalongError("set_trainable must run before the model is wrapped in DDP "
                            "(DDP allocates gradient buffers for the trainable parameters)")
    extras = validate_trainable(extras)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in model.named_parameters():
        param.requires_grad = full_finetune or (
            is_adapter_param(name)
            or ("embed" in extras and (name == weight_map.MEGATRON_EMBEDDING
                                        or (tied and name == weight_map.MEGATRON_OUTPUT)))
            or ("norm" in extras and is_norm_param(name))
        )


def parameter_counts(models) -> tuple[int, int]:
    """(trainable, total) over the whole model (one chunk or a list): summed over pipeline stages,
    TP shards counted once. Collective over the model-parallel group."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    counts = torch.zeros(2, dtype=torch.float64, device=device())  # nccl reduces device tensors
    for model in models if isinstance(models, (list, tuple)) else [models]:
        tied_copy = (getattr(model, "share_embeddings_and_output_weights", False)
                     and not model.pre_process)
        for name, param in model.named_parameters():
            if not param_is_not_tensor_parallel_duplicate(param):
                continue
            if tied_copy and name == weight_map.MEGATRON_OUTPUT:
                continue  # the last stage's copy of the tied embedding
            counts[1] += param.numel()
            if param.requires_grad:
                counts[0] += param.numel()
    if dist.is_initialized():
        dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return int(counts[0].item()), int(counts[1].item())


def describe_trainable(models) -> str:
    trainable, total = parameter_counts(models)
    return (f"trainable parameters: {trainable:,} of {total:,} "
            f"({100.0 * trainable / max(total, 1):.3f}%)")


def optimizer_overrides(optimizer_config, lora_b_lr_ratio=None) -> dict:
    """megatron `get_megatron_optimizer(config_overrides=...)`: megatron's standard overrides (no
    weight decay on biases and 1-D params) plus, for LoRA+ (--lora-b-lr-ratio), B's learning rate
    `ratio` times the base one. B parameters carry the attribute `lora_b`."""
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    overrides = get_standard_config_overrides(optimizer_config)
    if lora_b_lr_ratio is not None and lora_b_lr_ratio != 1.0:
        overrides[ParamKey(attr="lora_b")] = {
            "max_lr": optimizer_config.lr * lora_b_lr_ratio,
            "min_lr": (optimizer_config.min_lr or 0.0) * lora_b_lr_ratio,
        }
    return overrides


def setup_lora(models, lora: LoraConfig, *, seed: int = 1234, log=print):
    """The training setup's "adapters + freezing" step (before DDP). Returns (metadata for
    megalong.json or None, predicate of checkpoint keys that may be absent: the adapters, when
    training starts from a base model)."""
    models = models if isinstance(models, (list, tuple)) else [models]
    if lora.full_finetune:
        for model in models:
            set_trainable(model, (), full_finetune=True)
        log(describe_trainable(models))
        return None, lambda key: False
    options = lora.options(seed)
    for model in models:
        add_lora(model, options)
        set_trainable(model, lora.trainable_params)
    log(f"LoRA r={options.rank} alpha={options.alpha:g} on {','.join(options.parts)}; trainable "
        f"extras: {','.join(lora.trainable_params) or 'none'}; {describe_trainable(models)}")
    return lora_metadata(options, lora.trainable_params), is_adapter_param
