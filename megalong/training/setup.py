"""build_trainer(args): the training setup, read top to bottom.

runtime -> architecture -> model -> adapters + freezing -> DDP -> optimizer -> data -> resume.
Each step is a named function below, in that order.
"""

import dataclasses
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong import runtime
from megalong.checkpoint_meta import TOKENIZER_SUBDIR, read_metadata
from megalong.config import default_interpolation_factor, resolve_group_size
from megalong.errors import MegalongError
from megalong.model.arch import PRESETS, LlamaArch
from megalong.training.progress import log


@dataclass
class Trainer:
    args: object
    arch: LlamaArch
    metadata: dict  # written into every checkpoint: enough to rebuild the model
    models: list  # the megatron model chunks of this rank
    ddp_models: list  # the same, wrapped in megatron DDP
    optimizer: object
    scheduler: object
    train_data: object
    valid_data: object
    iteration: int = 0
    common: dict = field(default_factory=dict)


def build_trainer(args) -> Trainer:
    bring_up_runtime(args)
    arch, metadata = resolve_architecture(args)
    models = build_model_chunks(args, arch, metadata)
    allow_missing = add_adapters_and_freeze(models, args, metadata)
    ddp_models = wrap_data_parallel(models, args)
    optimizer, scheduler = build_optimizer_and_schedule(ddp_models, args)
    train_data, valid_data = build_datasets(args, arch)
    trainer = Trainer(args, arch, metadata, models, ddp_models, optimizer, scheduler,
                      train_data, valid_data)
    resume(trainer, allow_missing)
    return trainer


def bring_up_runtime(args) -> None:
    runtime.init_distributed(
        runtime.ParallelSizes(tensor=args.tensor_model_parallel_size,
                              pipeline=args.pipeline_model_parallel_size,
                              context=args.context_parallel_size),
        seed=args.seed, timeout_s=args.distributed_timeout_minutes * 60)
    if not runtime.use_cuda() and args.cpu_malloc == "reuse":
        runtime.keep_freed_memory()  # every step reallocates the same activations
    # Nodes launched with different flags would train different things (or hang in mismatched
    # collectives): every rank compares a hash of its parsed flags with the others'.
    runtime.check_ranks_agree(vars(args))


def resolve_architecture(args):
    """From --load's metadata (a converted HF model or a training checkpoint), else --model."""
    from megalong.convert.layouts import padded_vocab_size

    if args.load:
        source = read_metadata(args.load, getattr(args, "load_iteration", None))
        arch = LlamaArch(**source["arch"])
        padded = source["padded_vocab_size"]
        recorded_factor = source.get("interpolation_factor")
    elif args.model:
        source, arch = {}, PRESETS[args.model]
        padded = padded_vocab_size(arch.vocab_size, 128, args.tensor_model_parallel_size)
        recorded_factor = None
    else:
        raise MegalongError("give --load (a converted checkpoint) or --model (a preset, random init)")
    if padded % args.tensor_model_parallel_size:
        raise MegalongError(f"the checkpoint's padded vocabulary {padded} does not split over "
                            f"tensor-model-parallel-size {args.tensor_model_parallel_size}")
    seq_length = args.seq_length or arch.max_position_embeddings
    factor = args.rotary_seq_len_interpolation_factor or default_interpolation_factor(
        seq_length, arch.max_position_embeddings, recorded_factor)
    metadata = {
        **{k: v for k, v in source.items() if k not in ("iteration", "has_training_state")},
        "format": "megalong-1",
        "arch": dataclasses.asdict(arch),
        "padded_vocab_size": padded,
        "interpolation_factor": factor,
        "seq_length": seq_length,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
    }
    return arch, metadata


def build_model_chunks(args, arch, metadata) -> list:
    from megalong.model.llama import ModelOptions, build_llama

    seq_length = metadata["seq_length"]
    group_size = (resolve_group_size(seq_length, args.group_size, args.group_size_ratio)
                  if args.attention == "s2" else None)
    opts = ModelOptions(
        seq_length=seq_length,
        padded_vocab_size=metadata["padded_vocab_size"],
        attention=args.attention,
        group_size=group_size,
        attention_kernel=args.attention_kernel,
        interpolation_factor=metadata["interpolation_factor"],
        transformer_impl=args.transformer_impl,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=tuple(args.recompute_modules) if args.recompute_modules else None,
        loss_chunk_tokens=args.loss_chunk_tokens,
        initialize=not args.load,
        fp8_format=args.fp8_format,
    )
    model = build_llama(arch, opts)
    if runtime.use_cuda():
        model.cuda()
    return [model]


def add_adapters_and_freeze(models, args, metadata):
    """LoRA adapters + trainable embedding/norms (LongLoRA's LoRA+), or everything with
    --full-finetune; frozen before DDP. Returns which checkpoint keys may be absent (the
    adapters, when starting from a base model)."""
    from megalong.lora.apply import setup_lora

    metadata["lora"], allow_missing = setup_lora(models, args, log)
    return allow_missing


def ddp_config(args):
    """megatron DDP's settings. The overlaps live here, not in OptimizerConfig: with
    --overlap-param-gather the distributed optimizer's step leaves the parameter all-gather to
    forward pre-hooks of the next forward (validated to come with --use-distributed-optimizer
    and --overlap-grad-reduce); under PP every stage launches its all-gathers at once."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        align_param_gather=args.overlap_param_gather and args.pipeline_model_parallel_size > 1,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )


def wrap_data_parallel(models, args) -> list:
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    settings = ddp_config(args)
    ddp_models = [DistributedDataParallel(m.config, settings, m) for m in models]
    models[0].config.finalize_model_grads_func = finalize_model_grads
    set_schedule_sync_funcs(models[0].config, ddp_models, settings)
    return ddp_models


def set_schedule_sync_funcs(config, ddp_models, settings) -> None:
    """As Megatron-LM sets them: the schedules skip gradient reduction on all but the last
    micro-batch (no_sync); with the overlaps on, pipeline schedules start each chunk's
    gradient reduction (grad_sync_func) and, with aligned parameter gathers, its parameter
    all-gather (param_sync_func) themselves."""

    def one_or_list(funcs):
        return funcs[0] if len(funcs) == 1 else funcs

    config.no_sync_func = one_or_list([m.no_sync for m in ddp_models])
    if settings.overlap_grad_reduce:
        config.grad_sync_func = one_or_list([m.start_grad_sync for m in ddp_models])
    if settings.overlap_param_gather and settings.align_param_gather:
        config.param_sync_func = one_or_list([m.start_param_sync for m in ddp_models])


def build_optimizer_and_schedule(ddp_models, args):
    from megalong.training.optimizer import build_optimizer, build_scheduler

    optimizer = build_optimizer(ddp_models, args)
    ddp_models[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer, build_scheduler(optimizer, args)


def build_datasets(args, arch):
    """Pretraining samples from IndexedDatasets (--data-path), or SFT samples (--sft-data)."""
    seq_length = args.seq_length or arch.max_position_embeddings
    from megalong.training.tokenizer_check import load_checked_tokenizer

    tokenizer = load_checked_tokenizer(args, arch)
    if args.sft_data:
        from megalong.data.sft import SftDataset

        group_size = resolve_group_size(seq_length, args.group_size, args.group_size_ratio)
        # Pipeline stages exchange fixed-size activations; micro-batches > 1 need equal lengths;
        # context-parallel slices of seq-length are validated multiples of G/2 (a sample padded
        # only to a multiple of G may not split).
        fixed = (args.pipeline_model_parallel_size > 1 or args.micro_batch_size > 1
                 or args.context_parallel_size > 1)
        dataset = SftDataset(args.sft_data, tokenizer, seq_length=seq_length,
                             group_size=group_size, pad_to_seq_length=fixed)
        return dataset, dataset if args.eval_interval else None
    from megalong.data.pretrain import build_pretrain_datasets

    num_train = args.train_iters * args.global_batch_size
    num_valid = args.eval_iters * args.global_batch_size if args.eval_interval else 0
    return build_pretrain_datasets(args.data_path, seq_length, seed=args.seed, split=args.split,
                                   num_samples=(num_train, num_valid), tokenizer=tokenizer)


def resume(trainer: Trainer, allow_missing) -> None:
    """--load: weights, and the full training state when the checkpoint has it (not --finetune)."""
    from megalong.checkpoint import load_checkpoint

    args = trainer.args
    if not args.load:
        return
    iteration, common = load_checkpoint(
        trainer.models, args.load, getattr(args, "load_iteration", None),
        optimizer=None if args.finetune else trainer.optimizer,
        scheduler=None if args.finetune else trainer.scheduler,
        allow_missing=allow_missing, fallback=getattr(args, "load_fallback", False))
    if common:
        trainer.iteration, trainer.common = iteration, common
        log(f"resumed from {args.load} at iteration {iteration}")
    else:
        trainer.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
        log(f"loaded weights from {args.load} (iteration {iteration}); training from iteration 0")
    if args.save and dist.get_rank() == 0:
        _carry_tokenizer(args.load, args.save)


def _carry_tokenizer(load: str, save: str) -> None:
    """Tokenizer files travel with checkpoints, so an export finds them."""
    source = os.path.join(load, TOKENIZER_SUBDIR)
    target = os.path.join(save, TOKENIZER_SUBDIR)
    if os.path.isdir(source) and not os.path.isdir(target) and os.path.abspath(load) != os.path.abspath(save):
        os.makedirs(save, exist_ok=True)
        staging = target + ".tmp"  # a crash mid-copy must not leave a partial tokenizer behind
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        os.replace(staging, target)


def data_parallel_rank_and_size():
    return (parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size())
