"""megatron-core's optimizer (AdamW; distributed on GPU when asked) and LR schedule."""

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megalong.config.training import TrainingConfig
from megalong.lora.apply import optimizer_overrides


def build_optimizer(model_chunks, training: TrainingConfig, lora_b_lr_ratio=None):
    config = OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: AdamW
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=training.bf16,
        params_dtype=model_chunks[0].config.params_dtype,
        use_distributed_optimizer=training.use_distributed_optimizer,
        overlap_param_gather=training.overlap_param_gather,
    )
    # LoRA+ (--lora-b-lr-ratio): B factors get a larger learning rate.
    overrides = optimizer_overrides(config, lora_b_lr_ratio)
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)


def build_scheduler(optimizer, training: TrainingConfig) -> OptimizerParamScheduler:
    """Linear warm-up, then constant (LongLoRA's default) or cosine decay to --min-lr."""
    warmup = min(training.lr_warmup_iters, training.train_iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training.lr,
        min_lr=training.min_lr if training.lr_decay_style == "cosine" else training.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(training.train_iters, warmup + 1),
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
