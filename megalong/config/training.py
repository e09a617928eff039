"""How training runs: batches, optimizer and schedule, precision, recompute, data-parallel
communication, evaluation, logging and exits; and which checkpoints it reads and writes."""

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from megalong.config._fields import as_tuple, check_positive, from_namespace
from megalong.config.checkpoint import latest_iteration
from megalong.config.model import LOSS_CHUNK_TOKENS, RECOMPUTE_MODULES, importable
from megalong.device_policy import cuda_possible
from megalong.errors import MegalongError


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    load: Optional[str] = None
    finetune: bool = False
    load_fallback: bool = False
    save: Optional[str] = None
    save_interval: Optional[int] = None
    # Resolved, not a flag: the iteration of --load to start from (an older intact one with
    # --load-fallback); None: the latest.
    load_iteration: Optional[int] = None

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("initialisation and checkpoints")
        group.add_argument("--load", default=None,
                           help="checkpoint directory to start from (a converted HF model or a "
                                "training checkpoint; training state is resumed when present)")
        group.add_argument("--finetune", action="store_true",
                           help="load only the weights from --load: new optimizer, iteration 0")
        group.add_argument("--load-fallback", action="store_true",
                           help="when --load's latest checkpoint is damaged (a file missing, "
                                "truncated or failing its checksum), load the newest intact older "
                                "iteration instead of stopping with an error")
        group.add_argument("--save", default=None, help="checkpoint directory to write")
        group.add_argument("--save-interval", type=int, default=None,
                           help="iterations between checkpoints")

    @classmethod
    def from_args(cls, namespace) -> "CheckpointConfig":
        return from_namespace(cls, namespace)

    def validate(self) -> None:
        if self.load:
            latest_iteration(self.load)
        if self.save:
            parent = os.path.dirname(os.path.abspath(self.save))
            if os.path.exists(self.save) and not os.path.isdir(self.save):
                raise MegalongError(f"--save {self.save} exists and is not a directory")
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise MegalongError(f"--save {self.save}: cannot write to {parent}")
        if self.save_interval is not None and (self.save_interval < 1 or not self.save):
            raise MegalongError("--save-interval needs --save and must be >= 1")
        if self.load_fallback and not self.load:
            raise MegalongError("--load-fallback needs --load")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None: micro batch x data-parallel size
    train_iters: Optional[int] = None
    # AdamW and the learning-rate schedule
    lr: float = 2e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 20
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    max_skipped_steps: int = 10
    # numerics, memory and communication
    bf16: bool = False
    fp8_format: Optional[str] = None
    recompute_granularity: Optional[str] = None
    recompute_modules: Optional[tuple] = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS
    cpu_malloc: str = "reuse"
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # evaluation, logging and exit
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    exit_signal_handler: bool = False
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    distributed_timeout_minutes: float = 10.0

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        train = parser.add_argument_group("training")
        train.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")
        train.add_argument("--micro-batch-size", type=int, default=1)
        train.add_argument("--global-batch-size", type=int, default=None,
                           help="sequences per optimizer step (default micro-batch x data-parallel)")
        train.add_argument("--train-iters", type=int, default=None, help="optimizer steps to run")
        train.add_argument("--lr", type=float, default=2e-5,
                           help="peak learning rate (LongLoRA: 2e-5)")
        train.add_argument("--min-lr", type=float, default=0.0,
                           help="final learning rate for cosine")
        train.add_argument("--lr-warmup-iters", type=int, default=20,
                           help="linear warm-up steps (default 20)")
        train.add_argument("--lr-decay-style", choices=["constant", "cosine"], default="constant",
                           help="constant after warm-up (LongLoRA's) or cosine to --min-lr")
        train.add_argument("--weight-decay", type=float, default=0.0)
        train.add_argument("--adam-beta1", type=float, default=0.9)
        train.add_argument("--adam-beta2", type=float, default=0.95)
        train.add_argument("--adam-eps", type=float, default=1e-8)
        train.add_argument("--clip-grad", type=float, default=1.0,
                           help="gradient norm clipping (0: off)")
        train.add_argument("--max-skipped-steps", type=int, default=10,
                           help="stop (after saving the last good state) when more than this many "
                                "steps in a row have a non-finite loss or gradient norm "
                                "(default 10)")
        train.add_argument("--bf16", action="store_true",
                           help="bfloat16 weights and compute, float32 main weights in the "
                                "optimizer (GPUs; on CPU faster than float32 only with bf16 GEMMs: "
                                "AVX512-BF16, AMX)")
        train.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                           help="FP8 through Transformer Engine (GPU with TE only)")
        train.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                           help="activation recompute: full layers, or selective (the submodules "
                                "of --recompute-modules)")
        train.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES,
                           default=None, metavar="MODULE",
                           help="with --recompute-granularity selective, megatron-core's selective "
                                "recompute by submodule: core_attn (S²-Attn itself), layernorm "
                                "(the two RMSNorms of each layer), mlp (the SwiGLU MLP); "
                                "megatron's default core_attn. Activations of what is not listed "
                                "are kept")
        train.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform",
                           help="with --recompute-granularity full: 'uniform' recomputes every "
                                "layer (checkpointing --recompute-num-layers at a time); 'block' "
                                "recomputes only the first --recompute-num-layers layers of each "
                                "pipeline stage and keeps the others' activations (faster, more "
                                "memory)")
        train.add_argument("--recompute-num-layers", type=int, default=1,
                           help="layers per checkpoint (uniform) or layers recomputed (block)")
        train.add_argument("--loss-chunk-tokens", type=int, default=LOSS_CHUNK_TOKENS,
                           help="compute the lm_head and cross entropy this many tokens at a "
                                "time, so the [tokens, vocabulary] logits are never whole in "
                                "memory; 0: megatron's loss on the whole logits (default "
                                f"{LOSS_CHUNK_TOKENS})")
        train.add_argument("--cpu-malloc", choices=["reuse", "release"], default="reuse",
                           help="CPU runs only: 'reuse' keeps freed memory in the process for the "
                                "next step (glibc serves big blocks from its heap and never trims "
                                "it, so steps do not page-fault their activations in again: 10-20 "
                                "%% faster at 8k in docs/perf_log.md, but the resident set stays "
                                "at a fragmented high-water mark); 'release' returns big blocks "
                                "to the kernel, glibc's default (least resident memory: the "
                                "longest context in a budget)")
        train.add_argument("--use-distributed-optimizer", action="store_true",
                           help="shard optimizer state over data-parallel ranks (megatron's; GPUs)")
        train.add_argument("--overlap-grad-reduce", action="store_true",
                           help="overlap the data-parallel gradient reduction with the backward "
                                "pass (megatron DDP)")
        train.add_argument("--overlap-param-gather", action="store_true",
                           help="overlap the distributed optimizer's parameter all-gather with the "
                                "next forward pass (needs --use-distributed-optimizer and "
                                "--overlap-grad-reduce; parameters are gathered in full before "
                                "every evaluation and checkpoint)")

        run = parser.add_argument_group("evaluation, logging and exit")
        run.add_argument("--eval-interval", type=int, default=None,
                         help="iterations between validations")
        run.add_argument("--eval-iters", type=int, default=10,
                         help="validation batches per evaluation")
        run.add_argument("--log-interval", type=int, default=1,
                         help="iterations between log lines")
        run.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
        run.add_argument("--exit-signal-handler", action="store_true",
                         help="on SIGTERM, save a checkpoint and exit cleanly")
        run.add_argument("--exit-duration-in-mins", type=float, default=None,
                         help="save and exit after this many minutes")
        run.add_argument("--exit-interval", type=int, default=None,
                         help="save and exit once the iteration is a multiple of this")
        run.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                         help="timeout of collective operations: a rank that waits longer for the "
                              "others (one hangs or died) stops with an error (default 10)")

    @classmethod
    def from_args(cls, namespace) -> "TrainingConfig":
        return from_namespace(cls, namespace,
                              recompute_modules=as_tuple(namespace.recompute_modules))

    def validate(self, data_parallel_size: int) -> None:
        for name in ("micro_batch_size", "train_iters", "eval_iters", "log_interval",
                     "recompute_num_layers"):
            check_positive(name.replace("_", "-"), getattr(self, name))
        check_positive("lr-warmup-iters", self.lr_warmup_iters, minimum=0)
        if self.train_iters is None:
            raise MegalongError("--train-iters is required")
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size is not None and self.global_batch_size % per_step:
            raise MegalongError(
                f"global batch {self.global_batch_size} is not divisible by micro batch "
                f"{self.micro_batch_size} x data-parallel size {data_parallel_size}; use a "
                f"multiple of {per_step}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise MegalongError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.lr}) and "
                                "--lr > 0")
        if self.loss_chunk_tokens < 0:
            raise MegalongError(f"--loss-chunk-tokens must be >= 0, got {self.loss_chunk_tokens}")
        if self.recompute_modules and self.recompute_granularity != "selective":
            raise MegalongError("--recompute-modules chooses what selective recompute recomputes: "
                                "add --recompute-granularity selective")
        if self.recompute_method == "block" and self.recompute_granularity != "full":
            raise MegalongError("--recompute-method block needs --recompute-granularity full")
        if self.max_skipped_steps < 0:
            raise MegalongError(f"--max-skipped-steps must be >= 0, got {self.max_skipped_steps}")
        if not self.distributed_timeout_minutes > 0:
            raise MegalongError(f"--distributed-timeout-minutes must be > 0, got "
                                f"{self.distributed_timeout_minutes}")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise MegalongError(f"--exit-interval must be >= 1, got {self.exit_interval}")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise MegalongError(f"--exit-duration-in-mins must be > 0, got "
                                f"{self.exit_duration_in_mins}")
        if self.fp8_format and not importable("transformer_engine"):
            raise MegalongError("--fp8-format needs Transformer Engine on a GPU, which is not "
                                "installed")
        if self.use_distributed_optimizer and not cuda_possible():
            raise MegalongError("--use-distributed-optimizer runs on GPUs only; drop it on CPU")
        if self.overlap_param_gather and not (self.use_distributed_optimizer
                                              and self.overlap_grad_reduce):
            raise MegalongError("--overlap-param-gather overlaps the distributed optimizer's "
                                "parameter all-gather with the forward pass: add "
                                "--use-distributed-optimizer and --overlap-grad-reduce (as "
                                "Megatron-LM requires)")
