"""train(job): steps through megatron-core's schedules, validation, checkpoints, clean exits."""

import contextlib
import signal
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong import checkpoint, faults, runtime
from megalong.attention.context_parallel import HALO_COUNTER
from megalong.config.job import JobConfig
from megalong.config.training import TrainingConfig
from megalong.errors import MegalongError
from megalong.log import log
from megalong.model.forward import run_microbatches
from megalong.training.batches import microbatches
from megalong.training.numerics import guarded_step
from megalong.training.progress import Progress
from megalong.training.setup import Trainer, build_trainer, data_parallel_rank_and_size


def _reduced_loss(outputs) -> tuple[float, int]:
    """Token-weighted mean loss of the global batch, known on every rank. Losses live on the last
    pipeline stage; they are summed over data (and context) parallel ranks, then broadcast."""
    total = torch.zeros(2, dtype=torch.float64)
    for out in outputs:
        total[0] += float(out["loss_sum"])
        total[1] += float(out["num_tokens"])
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.broadcast(total, src=dist.get_world_size() - 1)
    return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item())


def train_step(trainer: Trainer, iteration: int):
    training = trainer.job.training
    dp_rank, dp_size = data_parallel_rank_and_size()
    batches = microbatches(trainer.train_data, iteration, training.global_batch_size,
                           training.micro_batch_size, dp_rank, dp_size, trainer.arch.vocab_size)
    for model in trainer.ddp_models:
        model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    outputs = run_microbatches(trainer.ddp_models, batches, forward_only=False)
    loss, _ = _reduced_loss(outputs)
    loss = faults.corrupt_loss(iteration, loss)
    lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this step uses
    updated, grad_norm = guarded_step(trainer.optimizer, loss)
    if updated:
        trainer.scheduler.step(increment=1)
    return loss, lr, grad_norm, updated


@contextlib.contextmanager
def parameters_in_sync(trainer: Trainer):
    """With --overlap-param-gather the distributed optimizer's step leaves each rank's updated
    parameter shards to be all-gathered by forward pre-hooks of the next training forward:
    until then the other shards of every rank's model are one step stale. Evaluation and
    checkpoints need them now: the hooks are disabled, which gathers synchronously, and
    re-enabled afterwards (as Megatron-LM does around both)."""
    training = trainer.job.training
    if not (training.use_distributed_optimizer and training.overlap_param_gather):
        yield
        return
    for model in trainer.ddp_models:
        model.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for model in trainer.ddp_models:
            model.enable_forward_pre_hook()


def evaluate(trainer: Trainer) -> float:
    with parameters_in_sync(trainer):
        return _evaluate(trainer)


def _evaluate(trainer: Trainer) -> float:
    training = trainer.job.training
    dp_rank, dp_size = data_parallel_rank_and_size()
    for model in trainer.ddp_models:
        model.eval()
    outputs = []
    with torch.no_grad():
        for index in range(training.eval_iters):
            batches = microbatches(trainer.valid_data, index, training.global_batch_size,
                                   training.micro_batch_size, dp_rank, dp_size,
                                   trainer.arch.vocab_size)
            outputs += run_microbatches(trainer.ddp_models, batches, forward_only=True)
    for model in trainer.ddp_models:
        model.train()
    return _reduced_loss(outputs)[0]


def save(trainer: Trainer, iteration: int) -> None:
    save_dir = trainer.job.checkpoint.save
    with parameters_in_sync(trainer):  # an export reads these weights: none may be stale
        checkpoint.save_checkpoint(trainer.models, save_dir, iteration, trainer.metadata,
                                   optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                                   common={"iteration": iteration})
    log(f"saved checkpoint at iteration {iteration} to {save_dir}")


class _ExitRequests:
    """--exit-interval, SIGTERM (with --exit-signal-handler) or --exit-duration-in-mins; the
    time- and signal-based requests are agreed between ranks, so all exit at the same step."""

    def __init__(self, training: TrainingConfig):
        self.signalled = False
        self.deadline = (time.monotonic() + training.exit_duration_in_mins * 60
                         if training.exit_duration_in_mins else None)
        self.interval = training.exit_interval
        if training.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.signalled = True

    def should_exit(self, iteration: int) -> bool:
        if self.interval and iteration % self.interval == 0:
            return True
        local = self.signalled or (self.deadline is not None and time.monotonic() > self.deadline)
        flag = torch.tensor([1 if local else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(job: JobConfig) -> list[float]:
    """Runs the training; returns the per-iteration training losses (on every rank). A collective
    that fails because another rank died or hangs ends this rank with a one-line error."""
    with runtime.distributed_failures_as_errors(job.training.distributed_timeout_minutes):
        return _train(job)


def _train(job: JobConfig) -> list[float]:
    trainer = build_trainer(job)
    training, save_dir = job.training, job.checkpoint.save
    save_interval = job.checkpoint.save_interval
    progress = Progress(train_iters=training.train_iters, start_iteration=trainer.iteration,
                        tokens_per_step=training.global_batch_size * trainer.metadata.seq_length,
                        tensorboard_dir=training.tensorboard_dir,
                        enabled=dist.get_rank() == dist.get_world_size() - 1)
    exits = _ExitRequests(training)
    losses = []
    skipped_in_a_row = 0
    iteration = trainer.iteration
    while iteration < training.train_iters:
        started = time.monotonic()
        HALO_COUNTER.reset()
        loss, lr, grad_norm, updated = train_step(trainer, iteration)
        iteration += 1
        losses.append(loss)
        faults.record_loss(iteration, loss)
        skipped_in_a_row = 0 if updated else skipped_in_a_row + 1
        if skipped_in_a_row > training.max_skipped_steps:
            if save_dir:
                save(trainer, iteration)  # skipped steps changed nothing: the last good state
            raise MegalongError(
                f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient norm "
                f"(--max-skipped-steps {training.max_skipped_steps}) at iteration {iteration}"
                + (f"; the last good state is saved in {save_dir}" if save_dir else ""))
        if iteration % training.log_interval == 0 or iteration == training.train_iters:
            # Context parallel: halo bytes per layer of this step, the most any rank received.
            halo = (HALO_COUNTER.per_layer_max_over_ranks()
                    if job.parallel.context_parallel_size > 1 else None)
            progress.step(iteration, loss=loss, lr=lr, grad_norm=grad_norm,
                          step_time=time.monotonic() - started, skipped=not updated, halo=halo)
        faults.after_iteration(iteration)  # fault injection (tests only)
        if (training.eval_interval and trainer.valid_data is not None
                and iteration % training.eval_interval == 0):
            progress.validation(iteration, evaluate(trainer))
        saved_now = bool(save_dir and save_interval and iteration % save_interval == 0)
        if saved_now:
            save(trainer, iteration)
        if iteration < training.train_iters and exits.should_exit(iteration):
            if save_dir and not saved_now:
                save(trainer, iteration)
            log(f"exiting at iteration {iteration} as requested")
            break
    else:
        already_saved = save_interval and iteration % save_interval == 0
        if save_dir and iteration > trainer.iteration and not already_saved:
            save(trainer, iteration)
    progress.close()
    return losses
