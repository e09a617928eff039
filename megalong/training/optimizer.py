"""megatron-core's optimizer (AdamW; distributed on GPU when asked) and LR schedule."""

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_optimizer(model_chunks, args):
    config = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: AdamW
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=model_chunks[0].config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )
    from megalong.lora.apply import optimizer_overrides

    # LoRA+ (--lora-b-lr-ratio): B factors get a larger learning rate.
    overrides = optimizer_overrides(config, args.lora_b_lr_ratio)
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)


def build_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Linear warm-up, then constant (LongLoRA's default) or cosine decay to --min-lr."""
    warmup = min(args.lr_warmup_iters, args.train_iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr if args.lr_decay_style == "cosine" else args.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(args.train_iters, warmup + 1),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
