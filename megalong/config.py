"""Model flags (Megatron-LM's names, LongLoRA's for its own) and their validation, torch-free,
so a CLI rejects bad input before paying torch's start-up. One error type: MegalongError."""

import argparse
import importlib.util
import math

from megalong.errors import MegalongError
from megalong.model.arch import PRESETS, LlamaArch


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
    group.add_argument("--attention-kernel", choices=["auto", "sdpa", "flash", "te"], default="auto",
                       help="inner attention kernel: torch SDPA (CPU/GPU), flash-attn varlen or "
                            "Transformer Engine (GPU); auto picks the fastest available")
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
    if args.attention == "s2":
        resolve_group_size(seq_length, args.group_size, args.group_size_ratio)
    if cp > 1 and args.attention == "s2":
        raise MegalongError("--context-parallel-size > 1 with --attention s2 is not supported yet")
    factor = args.rotary_seq_len_interpolation_factor
    if factor is not None and factor < 1:
        raise MegalongError(f"--rotary-seq-len-interpolation-factor must be >= 1, got {factor}")
    if args.transformer_impl == "transformer_engine" and not _importable("transformer_engine"):
        raise MegalongError("--transformer-impl transformer_engine needs Transformer Engine, which "
                            "is not installed (pip install 'megalong[gpu]', GPU only); use "
                            "--transformer-impl local")
    kernel_package = {"flash": "flash_attn", "te": "transformer_engine"}.get(args.attention_kernel)
    if kernel_package and not _importable(kernel_package):
        raise MegalongError(f"--attention-kernel {args.attention_kernel} needs {kernel_package}, "
                            f"which is not installed; use --attention-kernel sdpa or auto")


def default_interpolation_factor(seq_length, original_length, recorded=None):
    """LongLoRA's released models use ceil(target / original) (25 for 100k on Llama-2)."""
    if recorded is not None:
        return recorded
    if seq_length and seq_length > original_length:
        return float(math.ceil(seq_length / original_length))
    return None


def _importable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None
