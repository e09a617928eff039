"""build_trainer(job): the training setup, read top to bottom.

runtime -> architecture -> model -> adapters + freezing -> DDP -> optimizer -> data -> resume.
Each step is a named function below, in that order.
"""

import os
import shutil
from dataclasses import dataclass, field

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)

from megalong import runtime
from megalong.atomic import atomic_directory
from megalong.build import build_model, model_options
from megalong.checkpoint import load_checkpoint
from megalong.config.arch import PRESETS, LlamaArch
from megalong.config.checkpoint import TOKENIZER_SUBDIR, CheckpointMetadata, read_metadata
from megalong.config.job import JobConfig
from megalong.config.model import resolve_group_size
from megalong.data.pretrain import build_pretrain_datasets
from megalong.data.sft import SftDataset
from megalong.errors import MegalongError
from megalong.log import log
from megalong.lora.apply import setup_lora
from megalong.training.optimizer import build_optimizer, build_scheduler
from megalong.training.tokenizer_check import load_checked_tokenizer


@dataclass
class Trainer:
    job: JobConfig
    arch: LlamaArch
    metadata: CheckpointMetadata  # written into every checkpoint: enough to rebuild the model
    models: list  # the megatron model chunks of this rank
    ddp_models: list  # the same, wrapped in megatron DDP
    optimizer: object
    scheduler: object
    train_data: object
    valid_data: object
    iteration: int = 0
    common: dict = field(default_factory=dict)


def build_trainer(job: JobConfig, *, datasets=None) -> Trainer:
    """The trainer of a resolved job (JobConfig.resolved). `datasets` (train, valid) replaces the
    job's data (benchmarks train on synthetic tokens)."""
    bring_up_runtime(job)
    arch, metadata = resolve_architecture(job)
    models = build_model_chunks(job, arch, metadata)
    metadata, allow_missing = add_adapters_and_freeze(models, job, metadata)
    ddp_models = wrap_data_parallel(models, job)
    optimizer, scheduler = build_optimizer_and_schedule(ddp_models, job)
    train_data, valid_data = datasets or build_datasets(job, arch)
    trainer = Trainer(job, arch, metadata, models, ddp_models, optimizer, scheduler,
                      train_data, valid_data)
    resume(trainer, allow_missing)
    return trainer


def bring_up_runtime(job: JobConfig) -> None:
    training = job.training
    runtime.init_distributed(job.parallel, seed=training.seed,
                             timeout_s=training.distributed_timeout_minutes * 60)
    if not runtime.use_cuda() and training.cpu_malloc == "reuse":
        runtime.keep_freed_memory()  # every step reallocates the same activations
    # Nodes launched with different flags would train different things (or hang in mismatched
    # collectives): every rank compares a hash of its parsed flags with the others'.
    runtime.check_ranks_agree(job.flags())


def resolve_architecture(job: JobConfig):
    """From --load's metadata (a converted HF model or a training checkpoint), else --model."""
    tp = job.parallel.tensor_model_parallel_size
    load = job.checkpoint.load
    if load:
        source = read_metadata(load, job.checkpoint.load_iteration)
        arch, padded = source.arch, source.padded_vocab_size
        recorded_factor = source.interpolation_factor
    elif job.model.arch or job.model.model:
        source, arch = None, job.model.arch or PRESETS[job.model.model]
        padded = arch.padded_vocab(tp=tp)
        recorded_factor = None
    else:
        raise MegalongError("give --load (a converted checkpoint) or --model (a preset, random init)")
    if padded % tp:
        raise MegalongError(f"the checkpoint's padded vocabulary {padded} does not split over "
                            f"tensor-model-parallel-size {tp}")
    seq_length = job.model.seq_length_for(arch)
    arch, factor = job.model.rope_for(arch, recorded_factor)  # YaRN by flag, or linear
    layout = dict(arch=arch, padded_vocab_size=padded, interpolation_factor=factor,
                  seq_length=seq_length, tensor_model_parallel_size=tp,
                  pipeline_model_parallel_size=job.parallel.pipeline_model_parallel_size,
                  iteration=None, world_size=None, has_training_state=False)
    metadata = source.replace(**layout) if source else CheckpointMetadata(**layout)
    return arch, metadata


def build_model_chunks(job: JobConfig, arch, metadata) -> list:
    return [build_model(arch, model_options(job, metadata))]


def add_adapters_and_freeze(models, job: JobConfig, metadata):
    """LoRA adapters + trainable embedding/norms (LongLoRA's LoRA+), or everything with
    --full-finetune; frozen before DDP. Returns the metadata with the adapters recorded, and
    which checkpoint keys may be absent (the adapters, when starting from a base model)."""
    lora, allow_missing = setup_lora(models, job.lora, seed=job.training.seed, log=log)
    return metadata.replace(lora=lora), allow_missing


def ddp_config(job: JobConfig):
    """megatron DDP's settings. The overlaps live here, not in OptimizerConfig: with
    --overlap-param-gather the distributed optimizer's step leaves the parameter all-gather to
    forward pre-hooks of the next forward (validated to come with --use-distributed-optimizer
    and --overlap-grad-reduce); under PP every stage launches its all-gathers at once."""
    training = job.training
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=training.overlap_grad_reduce,
        overlap_param_gather=training.overlap_param_gather,
        align_param_gather=(training.overlap_param_gather
                            and job.parallel.pipeline_model_parallel_size > 1),
        use_distributed_optimizer=training.use_distributed_optimizer,
    )


def wrap_data_parallel(models, job: JobConfig) -> list:
    settings = ddp_config(job)
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


def build_optimizer_and_schedule(ddp_models, job: JobConfig):
    optimizer = build_optimizer(ddp_models, job.training, job.lora.lora_b_lr_ratio)
    ddp_models[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer, build_scheduler(optimizer, job.training)


def build_datasets(job: JobConfig, arch):
    """Pretraining samples from IndexedDatasets (--data-path), or SFT samples (--sft-data)."""
    data, training, parallel = job.data, job.training, job.parallel
    seq_length = job.model.seq_length_for(arch)
    tokenizer = load_checked_tokenizer(data.tokenizer, job.checkpoint.load, arch)
    if data.sft_data:
        group_size = resolve_group_size(seq_length, job.model.group_size,
                                        job.model.group_size_ratio)
        # Pipeline stages exchange fixed-size activations; micro-batches > 1 need equal lengths;
        # context-parallel slices of seq-length are validated multiples of G/2 (a sample padded
        # only to a multiple of G may not split).
        fixed = (parallel.pipeline_model_parallel_size > 1 or training.micro_batch_size > 1
                 or parallel.context_parallel_size > 1)
        dataset = SftDataset(data.sft_data, tokenizer, seq_length=seq_length,
                             group_size=group_size, pad_to_seq_length=fixed)
        return dataset, dataset if training.eval_interval else None
    num_train = training.train_iters * training.global_batch_size
    num_valid = (training.eval_iters * training.global_batch_size
                 if training.eval_interval else 0)
    return build_pretrain_datasets(data.data_path, seq_length, seed=training.seed,
                                   split=data.split, num_samples=(num_train, num_valid),
                                   tokenizer=tokenizer)


def resume(trainer: Trainer, allow_missing) -> None:
    """--load: weights, and the full training state when the checkpoint has it (not --finetune)."""
    checkpoint = trainer.job.checkpoint
    if not checkpoint.load:
        return
    iteration, common = load_checkpoint(
        trainer.models, checkpoint.load, checkpoint.load_iteration,
        optimizer=None if checkpoint.finetune else trainer.optimizer,
        scheduler=None if checkpoint.finetune else trainer.scheduler,
        allow_missing=allow_missing, fallback=checkpoint.load_fallback)
    if common:
        trainer.iteration, trainer.common = iteration, common
        log(f"resumed from {checkpoint.load} at iteration {iteration}")
    else:
        trainer.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
        log(f"loaded weights from {checkpoint.load} (iteration {iteration}); training from "
            "iteration 0")
    if checkpoint.save and dist.get_rank() == 0:
        _carry_tokenizer(checkpoint.load, checkpoint.save)


def _carry_tokenizer(load: str, save: str) -> None:
    """Tokenizer files travel with checkpoints, so an export finds them."""
    source = os.path.join(load, TOKENIZER_SUBDIR)
    target = os.path.join(save, TOKENIZER_SUBDIR)
    if os.path.isdir(source) and not os.path.isdir(target) and os.path.abspath(load) != os.path.abspath(save):
        # a crash mid-copy must not leave a partial tokenizer behind
        with atomic_directory(target) as staging:
            shutil.copytree(source, staging, dirs_exist_ok=True)


def data_parallel_rank_and_size():
    return (parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size())
