"""train(args): steps through megatron-core's schedules, validation, checkpoints, clean exits."""

import contextlib
import signal
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalong import faults, runtime
from megalong.attention.context_parallel import HALO_COUNTER
from megalong.errors import MegalongError
from megalong.model.forward import run_microbatches
from megalong.training.batches import microbatches
from megalong.training.numerics import guarded_step
from megalong.training.progress import Progress, log
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
    args = trainer.args
    dp_rank, dp_size = data_parallel_rank_and_size()
    batches = microbatches(trainer.train_data, iteration, args.global_batch_size,
                           args.micro_batch_size, dp_rank, dp_size, trainer.arch.vocab_size)
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
    args = trainer.args
    if not (args.use_distributed_optimizer and args.overlap_param_gather):
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
    args = trainer.args
    dp_rank, dp_size = data_parallel_rank_and_size()
    for model in trainer.ddp_models:
        model.eval()
    outputs = []
    with torch.no_grad():
        for index in range(args.eval_iters):
            batches = microbatches(trainer.valid_data, index, args.global_batch_size,
                                   args.micro_batch_size, dp_rank, dp_size, trainer.arch.vocab_size)
            outputs += run_microbatches(trainer.ddp_models, batches, forward_only=True)
    for model in trainer.ddp_models:
        model.train()
    return _reduced_loss(outputs)[0]


def save(trainer: Trainer, iteration: int) -> None:
    from megalong.checkpoint import save_checkpoint

    with parameters_in_sync(trainer):  # an export reads these weights: none may be stale
        save_checkpoint(trainer.models, trainer.args.save, iteration, trainer.metadata,
                        optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                        common={"iteration": iteration})
    log(f"saved checkpoint at iteration {iteration} to {trainer.args.save}")


class _ExitRequests:
    """--exit-interval, SIGTERM (with --exit-signal-handler) or --exit-duration-in-mins; the
    time- and signal-based requests are agreed between ranks, so all exit at the same step."""

    def __init__(self, args):
        self.signalled = False
        self.deadline = (time.monotonic() + args.exit_duration_in_mins * 60
                         if args.exit_duration_in_mins else None)
        self.interval = args.exit_interval
        if args.exit_signal_handler:
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


def train(args) -> list[float]:
    """Runs the training; returns the per-iteration training losses (on every rank). A collective
    that fails because another rank died or hangs ends this rank with a one-line error."""
    with runtime.distributed_failures_as_errors(args.distributed_timeout_minutes):
        return _train(args)


def _train(args) -> list[float]:
    trainer = build_trainer(args)
    seq_length = trainer.metadata["seq_length"]
    progress = Progress(train_iters=args.train_iters, start_iteration=trainer.iteration,
                        tokens_per_step=args.global_batch_size * seq_length,
                        tensorboard_dir=args.tensorboard_dir,
                        enabled=dist.get_rank() == dist.get_world_size() - 1)
    exits = _ExitRequests(args)
    losses = []
    skipped_in_a_row = 0
    iteration = trainer.iteration
    while iteration < args.train_iters:
        started = time.monotonic()
        HALO_COUNTER.reset()
        loss, lr, grad_norm, updated = train_step(trainer, iteration)
        iteration += 1
        losses.append(loss)
        faults.record_loss(iteration, loss)
        skipped_in_a_row = 0 if updated else skipped_in_a_row + 1
        if skipped_in_a_row > args.max_skipped_steps:
            if args.save:
                save(trainer, iteration)  # skipped steps changed nothing: the last good state
            raise MegalongError(
                f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient norm "
                f"(--max-skipped-steps {args.max_skipped_steps}) at iteration {iteration}"
                + (f"; the last good state is saved in {args.save}" if args.save else ""))
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            # Context parallel: halo bytes per layer of this step, the most any rank received.
            halo = HALO_COUNTER.per_layer_max_over_ranks() if args.context_parallel_size > 1 \
                else None
            progress.step(iteration, loss=loss, lr=lr, grad_norm=grad_norm,
                          step_time=time.monotonic() - started, skipped=not updated, halo=halo)
        faults.after_iteration(iteration)  # fault injection (tests only)
        if args.eval_interval and trainer.valid_data is not None and iteration % args.eval_interval == 0:
            progress.validation(iteration, evaluate(trainer))
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save(trainer, iteration)
        if iteration < args.train_iters and exits.should_exit(iteration):
            if args.save and not (args.save_interval and iteration % args.save_interval == 0):
                save(trainer, iteration)
            log(f"exiting at iteration {iteration} as requested")
            break
    else:
        already_saved = args.save_interval and iteration % args.save_interval == 0
        if args.save and iteration > trainer.iteration and not already_saved:
            save(trainer, iteration)
    progress.close()
    return losses
