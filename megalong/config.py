"""Model flags (Megatron-LM's names, LongLoRA's for its own) and their validation, torch-free,
so a CLI rejects bad input before paying torch's start-up. One error type: MegalongError."""

import argparse
import importlib.util
import math
import os

from megalong.device_policy import cuda_possible
from megalong.errors import MegalongError
from megalong.model.arch import PRESETS, LlamaArch

# megatron-core's selective-recompute submodules that a Llama layer has (its others are MoE/MLA).
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")

# Tokens per lm_head + cross-entropy chunk (model/chunked_loss.py): the training default, and what
# ModelOptions and the planner assume.
LOSS_CHUNK_TOKENS = 2048


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=sorted(PRESETS), default=None,
                       help="architecture preset (when no --hf-dir or --load gives one)")
    group.add_argument("--seq-length", type=int, default=None,
                       help="training sequence length N (S²-Attn groups are derived from it)")
    group.add_argument("--attention", choices=["s2", "full"], default="s2",
                       help="s2: shifted sparse attention while training (dense in eval); "
                            "full: dense causal attention always (default s2)")
    group.add_argument("--group-size-ratio", type=float, default=0.25,
                       help="S²-Attn group size as a fraction of --seq-length (default 0.25)")
    group.add_argument("--group-size", type=int, default=None,
                       help="S²-Attn group size G in tokens (overrides --group-size-ratio)")
    group.add_argument("--attention-kernel", default="auto",
                       choices=["auto", "sdpa", "torch-varlen", "flex", "flash", "te"],
                       help="inner attention kernel of S²-Attn: torch SDPA on the folded groups "
                            "(CPU/GPU, any dtype); torch's own varlen flash kernel (torch-varlen: "
                            "torch >= 2.10, GPU, --bf16) or FlexAttention (flex: one compiled "
                            "masked call per layer, GPU); the flash-attn package's varlen kernel "
                            "or Transformer Engine (GPU, --bf16); auto picks flash-attn, then TE, "
                            "then SDPA, by what fits the device and dtype")
    group.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                       help="megatron-core's own modules (CPU and GPU) or Transformer Engine linears "
                            "(GPU; checkpoints are interchangeable) (default local)")
    group.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                       help="linear RoPE position interpolation factor (default "
                            "ceil(seq-length / original length), or the checkpoint's)")

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--context-parallel-size", type=int, default=1)
    parallel.add_argument("--sequence-parallel", action="store_true",
                          help="shard norms/dropout activations over TP ranks (needs TP > 1)")


def resolve_group_size(seq_length: int, group_size=None, ratio: float = 0.25) -> int:
    """G from --group-size or --group-size-ratio; N % G == 0 and G even, else a clear error."""
    if group_size is None:
        group_size = int(round(seq_length * ratio))
        source = f"group-size-ratio {ratio} of seq-length {seq_length}"
    else:
        source = f"group-size {group_size}"
    if group_size < 2 or group_size > seq_length:
        raise MegalongError(f"S²-Attn group size {group_size} ({source}) must be between 2 and "
                            f"seq-length {seq_length}")
    if group_size % 2:
        raise MegalongError(f"S²-Attn group size {group_size} ({source}) must be even: shifted "
                            f"heads move groups by half a group")
    if seq_length % group_size:
        raise MegalongError(
            f"seq-length {seq_length} is not a multiple of group size {group_size} ({source}); "
            f"use a seq-length divisible by {group_size}, e.g. {seq_length // group_size * group_size or group_size}")
    return group_size


def validate_model_args(args, arch: LlamaArch) -> None:
    tp, pp, cp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.context_parallel_size)
    for name, value in [("tensor-model-parallel-size", tp), ("pipeline-model-parallel-size", pp),
                        ("context-parallel-size", cp)]:
        if value < 1:
            raise MegalongError(f"--{name} must be >= 1, got {value}")
    from megalong.convert.hf_config import validate_tp

    validate_tp(arch, tp, pp)
    if args.sequence_parallel and tp == 1:
        raise MegalongError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    seq_length = args.seq_length or arch.max_position_embeddings
    if args.sequence_parallel and seq_length % tp:
        raise MegalongError(f"--sequence-parallel: seq-length {seq_length} must be divisible by "
                            f"tensor-model-parallel-size {tp}")
    group_size = None
    if args.attention == "s2":
        group_size = resolve_group_size(seq_length, args.group_size, args.group_size_ratio)
    validate_context_parallel(seq_length, cp, group_size, tp=tp,
                              sequence_parallel=args.sequence_parallel)
    factor = args.rotary_seq_len_interpolation_factor
    if factor is not None and factor < 1:
        raise MegalongError(f"--rotary-seq-len-interpolation-factor must be >= 1, got {factor}")
    if args.transformer_impl == "transformer_engine" and not _importable("transformer_engine"):
        raise MegalongError("--transformer-impl transformer_engine needs Transformer Engine, which "
                            "is not installed (pip install 'megalong[gpu]', GPU only); use "
                            "--transformer-impl local")


# Kernels that train on CUDA tensors only: (half precision only?, the package it needs, or None
# for torch's own).
_GPU_KERNELS = {"torch-varlen": (True, None), "flex": (False, None),
                "flash": (True, "flash_attn"), "te": (True, "transformer_engine")}


def validate_attention_kernel(kernel: str, *, bf16: bool) -> None:
    """flash-attn and torch's varlen kernel take fp16/bf16 only (float32 fails at the first
    forward) and TE's fused attention backends likewise (in float32 TE silently falls back to
    its unfused one): an explicit request needs --bf16, a GPU and the package. FlexAttention
    trains on GPUs only (CPU has no backward). `auto` picks what fits at run time."""
    if kernel not in _GPU_KERNELS:
        return
    half_only, package = _GPU_KERNELS[kernel]
    if half_only and not bf16:
        raise MegalongError(f"--attention-kernel {kernel} runs in half precision only; add --bf16 "
                            "(or use --attention-kernel sdpa or auto for float32)")
    if not cuda_possible():
        raise MegalongError(f"--attention-kernel {kernel} runs on CUDA GPUs only and this run is "
                            "on the CPU; use --attention-kernel sdpa or auto")
    if package is not None and not _importable(package):
        raise MegalongError(f"--attention-kernel {kernel} needs {package}, which is not "
                            "installed; use --attention-kernel sdpa or auto")


def validate_context_parallel(seq_length: int, cp: int, group_size=None, *, tp: int = 1,
                              sequence_parallel: bool = False) -> None:
    """CP rank r holds tokens [rL, (r+1)L), L = N/c. With S²-Attn (group size G) L must be a
    multiple of G/2, so every slice starts at a group bound of one head half and the other
    half needs only the previous rank's last G/2 tokens (DESIGN.md §6); hence c <= 2N/G."""
    if cp == 1:
        return
    N = seq_length
    if group_size is None:
        if N % cp:
            valid = [c for c in range(2, min(N, 64) + 1) if N % c == 0][:6]
            raise MegalongError(f"--context-parallel-size {cp}: seq-length {N} does not split into "
                                f"{cp} equal slices; use a context-parallel size dividing {N}, "
                                f"e.g. {', '.join(map(str, valid))}")
    else:
        half = group_size // 2
        if N % cp or (N // cp) % half:
            valid_c = [c for c in range(2, 2 * N // group_size + 1)
                       if N % c == 0 and (N // c) % half == 0]
            advice = (f"use --context-parallel-size in {{{', '.join(map(str, valid_c))}}}"
                      if valid_c else "use a smaller group size")
            if N % cp == 0:
                valid_g = [g for g in range(2 * (N // cp), 1, -2)
                           if N % g == 0 and (N // cp) % (g // 2) == 0][:3]
                advice += (f", or keep c = {cp} with --group-size in "
                           f"{{{', '.join(map(str, valid_g))}}}")
            raise MegalongError(
                f"--context-parallel-size {cp}: each rank's slice of seq-length {N} "
                f"(L = N/c = {N / cp:g} tokens) must be a multiple of half the S²-Attn group size "
                f"(G/2 = {half}), so c can be at most 2N/G = {2 * N // group_size}; {advice}")
    if sequence_parallel and (N // cp) % tp:
        raise MegalongError(f"--sequence-parallel: each context-parallel slice ({N // cp} tokens "
                            f"of seq-length {N}) must be divisible by tensor-model-parallel-size "
                            f"{tp}")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    init = parser.add_argument_group("initialisation and checkpoints")
    init.add_argument("--load", default=None,
                      help="checkpoint directory to start from (a converted HF model or a training "
                           "checkpoint; training state is resumed when present)")
    init.add_argument("--finetune", action="store_true",
                      help="load only the weights from --load: new optimizer, iteration 0")
    init.add_argument("--load-fallback", action="store_true",
                      help="when --load's latest checkpoint is damaged (a file missing, truncated "
                           "or failing its checksum), load the newest intact older iteration "
                           "instead of stopping with an error")
    init.add_argument("--save", default=None, help="checkpoint directory to write")
    init.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints")
    init.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", nargs="+", default=None,
                      help="IndexedDataset prefix(es) from tools/preprocess_data.py, optionally "
                           "weighted as Megatron-LM does: 'W1 PREFIX1 W2 PREFIX2'")
    data.add_argument("--sft-data", default=None,
                      help="LongAlpaca-style json (instruction/input/output): supervised fine-tuning "
                           "with loss on the answers only")
    data.add_argument("--split", default="98,2,0", help="train,valid,test split of --data-path")
    data.add_argument("--tokenizer", default=None,
                      help="sentencepiece tokenizer.model or an HF tokenizer directory")

    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, default=1)
    train.add_argument("--global-batch-size", type=int, default=None,
                       help="sequences per optimizer step (default micro-batch x data-parallel)")
    train.add_argument("--train-iters", type=int, default=None, help="optimizer steps to run")
    train.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (LongLoRA: 2e-5)")
    train.add_argument("--min-lr", type=float, default=0.0, help="final learning rate for cosine")
    train.add_argument("--lr-warmup-iters", type=int, default=20, help="linear warm-up steps (default 20)")
    train.add_argument("--lr-decay-style", choices=["constant", "cosine"], default="constant",
                       help="constant after warm-up (LongLoRA's) or cosine to --min-lr")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--adam-beta1", type=float, default=0.9)
    train.add_argument("--adam-beta2", type=float, default=0.95)
    train.add_argument("--adam-eps", type=float, default=1e-8)
    train.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping (0: off)")
    train.add_argument("--max-skipped-steps", type=int, default=10,
                       help="stop (after saving the last good state) when more than this many "
                            "steps in a row have a non-finite loss or gradient norm (default 10)")
    train.add_argument("--bf16", action="store_true",
                       help="bfloat16 weights and compute, float32 main weights in the optimizer "
                            "(GPUs; on CPU faster than float32 only with bf16 GEMMs: "
                            "AVX512-BF16, AMX)")
    train.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                       help="FP8 through Transformer Engine (GPU with TE only)")
    train.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                       help="activation recompute: full layers, or selective (the submodules of "
                            "--recompute-modules)")
    train.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                       metavar="MODULE",
                       help="with --recompute-granularity selective, megatron-core's selective "
                            "recompute by submodule: core_attn (S²-Attn itself), layernorm (the "
                            "two RMSNorms of each layer), mlp (the SwiGLU MLP); megatron's "
                            "default core_attn. Activations of what is not listed are kept")
    train.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform",
                       help="with --recompute-granularity full: 'uniform' recomputes every layer "
                            "(checkpointing --recompute-num-layers at a time); 'block' recomputes "
                            "only the first --recompute-num-layers layers of each pipeline stage "
                            "and keeps the others' activations (faster, more memory)")
    train.add_argument("--recompute-num-layers", type=int, default=1,
                       help="layers per checkpoint (uniform) or layers recomputed (block)")
    train.add_argument("--loss-chunk-tokens", type=int, default=LOSS_CHUNK_TOKENS,
                       help="compute the lm_head and cross entropy this many tokens at a time, so "
                            "the [tokens, vocabulary] logits are never whole in memory; 0: "
                            f"megatron's loss on the whole logits (default {LOSS_CHUNK_TOKENS})")
    train.add_argument("--cpu-malloc", choices=["reuse", "release"], default="reuse",
                       help="CPU runs only: 'reuse' keeps freed memory in the process for the "
                            "next step (glibc serves big blocks from its heap and never trims "
                            "it, so steps do not page-fault their activations in again: 10-20 %% "
                            "faster at 8k in docs/perf_log.md, but the resident set stays at a "
                            "fragmented high-water mark); 'release' returns big blocks to the "
                            "kernel, glibc's default (least resident memory: the longest context "
                            "in a budget)")
    train.add_argument("--use-distributed-optimizer", action="store_true",
                       help="shard optimizer state over data-parallel ranks (megatron's; GPUs)")
    train.add_argument("--overlap-grad-reduce", action="store_true",
                       help="overlap the data-parallel gradient reduction with the backward pass "
                            "(megatron DDP)")
    train.add_argument("--overlap-param-gather", action="store_true",
                       help="overlap the distributed optimizer's parameter all-gather with the "
                            "next forward pass (needs --use-distributed-optimizer and "
                            "--overlap-grad-reduce; parameters are gathered in full before "
                            "every evaluation and checkpoint)")

    run = parser.add_argument_group("evaluation, logging and exit")
    run.add_argument("--eval-interval", type=int, default=None, help="iterations between validations")
    run.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    run.add_argument("--log-interval", type=int, default=1, help="iterations between log lines")
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


def validate_training_args(args, world_size: int) -> None:
    """Batch arithmetic, data and output paths: everything checkable before torch is imported."""
    validate_attention_kernel(args.attention_kernel, bf16=args.bf16)
    model_parallel = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                      * args.context_parallel_size)
    if world_size % model_parallel:
        raise MegalongError(
            f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
            f"= {model_parallel}")
    data_parallel = world_size // model_parallel
    for name in ("micro_batch_size", "train_iters", "lr_warmup_iters", "eval_iters", "log_interval",
                 "recompute_num_layers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "lr_warmup_iters" else 1):
            raise MegalongError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.train_iters is None:
        raise MegalongError("--train-iters is required")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * data_parallel
    if args.global_batch_size % (args.micro_batch_size * data_parallel):
        raise MegalongError(
            f"global batch {args.global_batch_size} is not divisible by micro batch "
            f"{args.micro_batch_size} x data-parallel size {data_parallel}; use a multiple of "
            f"{args.micro_batch_size * data_parallel}")
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise MegalongError(f"need 0 <= --min-lr ({args.min_lr}) <= --lr ({args.lr}) and --lr > 0")
    if (args.data_path is None) == (args.sft_data is None):
        raise MegalongError("give exactly one of --data-path (pretraining) or --sft-data (SFT)")
    if args.data_path:
        for prefix in _blend_prefixes(args.data_path):
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise MegalongError(f"--data-path {prefix}: {prefix + suffix} does not exist "
                                        "(make it with tools/preprocess_data.py)")
    if args.sft_data and not os.path.isfile(args.sft_data):
        raise MegalongError(f"--sft-data {args.sft_data} does not exist")
    if args.sft_data:
        _check_sft_head(args.sft_data)
    if args.sft_data and not args.tokenizer:
        raise MegalongError("--sft-data needs --tokenizer")
    if args.tokenizer and not os.path.exists(args.tokenizer):
        raise MegalongError(f"--tokenizer {args.tokenizer} does not exist")
    if args.load:
        from megalong.checkpoint_meta import latest_iteration

        latest_iteration(args.load)
    if args.save:
        parent = os.path.dirname(os.path.abspath(args.save))
        if os.path.exists(args.save) and not os.path.isdir(args.save):
            raise MegalongError(f"--save {args.save} exists and is not a directory")
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise MegalongError(f"--save {args.save}: cannot write to {parent}")
    if args.save_interval is not None and (args.save_interval < 1 or not args.save):
        raise MegalongError("--save-interval needs --save and must be >= 1")
    if args.loss_chunk_tokens < 0:
        raise MegalongError(f"--loss-chunk-tokens must be >= 0, got {args.loss_chunk_tokens}")
    if args.recompute_modules and args.recompute_granularity != "selective":
        raise MegalongError("--recompute-modules chooses what selective recompute recomputes: add "
                            "--recompute-granularity selective")
    if args.recompute_method == "block" and args.recompute_granularity != "full":
        raise MegalongError("--recompute-method block needs --recompute-granularity full")
    if args.max_skipped_steps < 0:
        raise MegalongError(f"--max-skipped-steps must be >= 0, got {args.max_skipped_steps}")
    if not args.distributed_timeout_minutes > 0:
        raise MegalongError(f"--distributed-timeout-minutes must be > 0, got "
                            f"{args.distributed_timeout_minutes}")
    if args.exit_interval is not None and args.exit_interval < 1:
        raise MegalongError(f"--exit-interval must be >= 1, got {args.exit_interval}")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise MegalongError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if args.load_fallback and not args.load:
        raise MegalongError("--load-fallback needs --load")
    if args.fp8_format and not _importable("transformer_engine"):
        raise MegalongError("--fp8-format needs Transformer Engine on a GPU, which is not installed")
    if args.fp8_format and args.transformer_impl != "transformer_engine":
        raise MegalongError("--fp8-format runs through Transformer Engine's linears: add "
                            "--transformer-impl transformer_engine")
    if args.use_distributed_optimizer and not cuda_possible():
        raise MegalongError("--use-distributed-optimizer runs on GPUs only; drop it on CPU")
    if args.overlap_param_gather and not (args.use_distributed_optimizer
                                          and args.overlap_grad_reduce):
        raise MegalongError("--overlap-param-gather overlaps the distributed optimizer's parameter "
                            "all-gather with the forward pass: add --use-distributed-optimizer "
                            "and --overlap-grad-reduce (as Megatron-LM requires)")


def _check_sft_head(path: str) -> None:
    """Cheap and torch-free: an empty file or list, or text that is neither json nor jsonl.
    (Every record is checked when the dataset is built.)"""
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = "".join(handle.read(4096).split())
    if head in ("", "[]"):
        raise MegalongError(f"--sft-data {path} holds no records")
    if head[0] not in "[{":
        raise MegalongError(f"--sft-data {path} is not json or jsonl (LongAlpaca: a list of "
                            "{instruction, input, output} records)")


def _blend_prefixes(data_path):
    """Prefixes of 'W1 P1 W2 P2' or 'P1 P2' (Megatron-LM's --data-path)."""
    try:
        float(data_path[0])
    except ValueError:
        return list(data_path)
    if len(data_path) % 2:
        raise MegalongError(f"--data-path {' '.join(data_path)}: weights and prefixes must pair up")
    return list(data_path[1::2])


def default_interpolation_factor(seq_length, original_length, recorded=None):
    """LongLoRA's released models use ceil(target / original) (25 for 100k on Llama-2)."""
    if recorded is not None:
        return recorded
    if seq_length and seq_length > original_length:
        return float(math.ceil(seq_length / original_length))
    return None


def _importable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# ---------------------------------------------------------------- LoRA+ (DESIGN.md §7)

from megalong.lora.options import TARGET_PARTS, TRAINABLE_EXTRAS  # noqa: E402  (torch-free)

LORA_TARGETS = tuple(TARGET_PARTS)
TRAINABLE_PARAM_GROUPS = TRAINABLE_EXTRAS


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA+")
    group.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (default 8)")
    group.add_argument("--lora-alpha", type=float, default=16.0,
                       help="LoRA alpha; the update is scaled by alpha / rank (default 16)")
    group.add_argument("--lora-dropout", type=float, default=0.0,
                       help="dropout on the adapters' input (default 0)")
    group.add_argument("--lora-targets", default="q,k,v,o",
                       help="comma-separated linears to adapt: q,k,v,o (attention), fc1 (gate+up), "
                            "fc2 (down) (default q,k,v,o)")
    group.add_argument("--trainable-params", default="embed,norm",
                       help="trained besides the adapters: embed (input embedding), norm (all "
                            "RMSNorms), comma-separated, or none for plain LoRA; lm_head stays "
                            "frozen (default embed,norm: LongLoRA's LoRA+)")
    group.add_argument("--full-finetune", action="store_true",
                       help="train every parameter, no adapters")
    group.add_argument("--lora-b-lr-ratio", type=float, default=None,
                       help="learning rate of the B factors relative to --lr (LoRA+ optimiser "
                            "paper; default 1)")


def check_lora_fits_checkpoint(args, metadata: dict, load: str) -> None:
    """A checkpoint that carries LoRA adapters continues only with adapters of the same shape
    (rank and adapted linears); torch-free, so the mismatch is named before start-up."""
    saved = metadata.get("lora")
    if not saved:
        return
    described = f"LoRA rank {saved['rank']} on {','.join(saved['parts'])}"
    if args.full_finetune:
        raise MegalongError(f"checkpoint {load} holds {described}; --full-finetune would drop the "
                            "adapters: export it with --merge-lora and convert it back, or drop "
                            "--full-finetune")
    from megalong.lora.options import parts_for_targets

    parts = list(parts_for_targets(args.lora_target_list))
    if int(saved["rank"]) != args.lora_rank or list(saved["parts"]) != parts:
        raise MegalongError(
            f"checkpoint {load} holds {described} but the flags ask for rank {args.lora_rank} on "
            f"{','.join(parts)}: the adapters would not fit; pass --lora-rank {saved['rank']} and "
            f"matching --lora-targets to continue it")


def _comma_list(value: str) -> list:
    return [item.strip() for item in value.split(",") if item.strip()]


def validate_lora_args(args) -> None:
    """Fills args.lora_target_list and args.trainable_param_list; clear errors otherwise."""
    if args.full_finetune:
        args.lora_target_list, args.trainable_param_list = [], []
        return
    if args.lora_rank < 1:
        raise MegalongError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if args.lora_alpha <= 0:
        raise MegalongError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise MegalongError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_b_lr_ratio is not None and args.lora_b_lr_ratio <= 0:
        raise MegalongError(f"--lora-b-lr-ratio must be > 0, got {args.lora_b_lr_ratio}")
    targets = _comma_list(args.lora_targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise MegalongError(f"--lora-targets {args.lora_targets!r}: unknown target(s) "
                            f"{', '.join(unknown) or '(none given)'}; valid: {','.join(LORA_TARGETS)}")
    groups = _comma_list(args.trainable_params)
    if groups == ["none"]:
        groups = []
    unknown = [g for g in groups if g not in TRAINABLE_PARAM_GROUPS]
    if unknown or not _comma_list(args.trainable_params):
        raise MegalongError(f"--trainable-params {args.trainable_params!r}: unknown group(s) "
                            f"{', '.join(unknown) or '(none given)'}; valid: "
                            f"{','.join(TRAINABLE_PARAM_GROUPS)} or none")
    args.lora_target_list, args.trainable_param_list = targets, groups
