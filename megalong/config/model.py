"""What model is trained and how it attends: preset, sequence length, S²-Attn groups, kernel,
RoPE interpolation. The group-size and context-parallel rules live here (DESIGN.md §5-§6)."""

import argparse
import importlib.util
import math
from dataclasses import dataclass
from typing import Optional

from megalong.config._fields import from_namespace
from megalong.config.arch import PRESETS, LlamaArch, validate_tp
from megalong.config.yarn import ROPE_TYPES, yarn_from_flags
from megalong.device_policy import cuda_possible
from megalong.errors import MegalongError


# megatron-core's selective-recompute submodules that a Llama layer has (its others are MoE/MLA).
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")

# Tokens per lm_head + cross-entropy chunk (model/chunked_loss.py): the training default, and what
# ModelOptions and the planner assume.
LOSS_CHUNK_TOKENS = 2048

ATTENTION_KERNELS = ("auto", "sdpa", "torch-varlen", "flex", "flash", "te")

# Attention patterns (DESIGN.md §5): S²-Attn; "short", the paper's ablation of S²-Attn without the
# shift (groups only: no token ever sees another group; not for production, refused under CP);
# dense causal attention.
ATTENTION_PATTERNS = ("s2", "short", "full")
GROUPED_PATTERNS = ("s2", "short")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model: Optional[str] = None  # a preset name (when no --load gives the architecture)
    # From Python only (benchmarks): an architecture that is no preset.
    arch: Optional[LlamaArch] = None
    seq_length: Optional[int] = None
    attention: str = "s2"
    group_size_ratio: float = 0.25
    group_size: Optional[int] = None
    attention_kernel: str = "auto"
    transformer_impl: str = "local"
    rotary_seq_len_interpolation_factor: Optional[float] = None
    # YaRN instead of linear interpolation (megatron-core's yarn_* names, Megatron-LM's
    # --rope-type): for a checkpoint whose config.json has no YaRN.
    rope_type: Optional[str] = None
    yarn_rotary_scaling_factor: Optional[float] = None
    yarn_beta_fast: Optional[float] = None
    yarn_beta_slow: Optional[float] = None
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("model")
        group.add_argument("--model", choices=sorted(PRESETS), default=None,
                           help="architecture preset (when no --hf-dir or --load gives one)")
        group.add_argument("--seq-length", type=int, default=None,
                           help="training sequence length N (S²-Attn groups are derived from it)")
        group.add_argument("--attention", choices=list(ATTENTION_PATTERNS), default="s2",
                           help="s2: shifted sparse attention while training (dense in eval); "
                                "full: dense causal attention always; short: groups without the "
                                "shift while training, the paper's ablation pattern (not for "
                                "production: no information crosses a group; refused under "
                                "context parallel) (default s2)")
        group.add_argument("--group-size-ratio", type=float, default=0.25,
                           help="S²-Attn group size as a fraction of --seq-length (default 0.25)")
        group.add_argument("--group-size", type=int, default=None,
                           help="S²-Attn group size G in tokens (overrides --group-size-ratio)")
        group.add_argument("--attention-kernel", default="auto", choices=list(ATTENTION_KERNELS),
                           help="inner attention kernel of S²-Attn: torch SDPA on the folded "
                                "groups (CPU/GPU, any dtype); torch's own varlen flash kernel "
                                "(torch-varlen: torch >= 2.10, GPU, --bf16) or FlexAttention "
                                "(flex: one compiled masked call per layer, GPU); the flash-attn "
                                "package's varlen kernel or Transformer Engine (GPU, --bf16); auto "
                                "picks flash-attn, then TE, then SDPA, by what fits the device "
                                "and dtype")
        group.add_argument("--transformer-impl", choices=["local", "transformer_engine"],
                           default="local",
                           help="megatron-core's own modules (CPU and GPU) or Transformer Engine "
                                "linears (GPU; checkpoints are interchangeable) (default local)")
        group.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                           help="linear RoPE position interpolation factor (default "
                                "ceil(seq-length / original length), or the checkpoint's)")
        group.add_argument("--rope-type", choices=list(ROPE_TYPES), default=None,
                           help="yarn: extend the context with YaRN (megatron-core's "
                                "YarnRotaryEmbedding) instead of linear interpolation, for a "
                                "checkpoint without it; rope: plain RoPE with linear "
                                "interpolation (default: the checkpoint's own scaling, else "
                                "linear interpolation)")
        group.add_argument("--yarn-rotary-scaling-factor", type=float, default=None,
                           help="with --rope-type yarn: YaRN's factor (default ceil(seq-length / "
                                "original length))")
        group.add_argument("--yarn-beta-fast", type=float, default=None,
                           help="with --rope-type yarn: YaRN's beta_fast (default 32)")
        group.add_argument("--yarn-beta-slow", type=float, default=None,
                           help="with --rope-type yarn: YaRN's beta_slow (default 1)")
        group.add_argument("--yarn-mscale", type=float, default=None,
                           help="with --rope-type yarn: YaRN's mscale (with --yarn-mscale-all-dim; "
                                "default: attention factor 0.1 ln(factor) + 1)")
        group.add_argument("--yarn-mscale-all-dim", type=float, default=None,
                           help="with --rope-type yarn: YaRN's mscale_all_dim")

    @classmethod
    def from_args(cls, namespace) -> "ModelConfig":
        return from_namespace(cls, namespace)

    def seq_length_for(self, arch: LlamaArch) -> int:
        return self.seq_length or arch.max_position_embeddings

    def group_size_for(self, seq_length: int) -> Optional[int]:
        """G while training (None with dense attention)."""
        if self.attention not in GROUPED_PATTERNS:
            return None
        return resolve_group_size(seq_length, self.group_size, self.group_size_ratio)

    def validate(self, arch: LlamaArch, parallel) -> None:
        parallel.validate()
        tp = parallel.tensor_model_parallel_size
        validate_tp(arch, tp, parallel.pipeline_model_parallel_size)
        seq_length = self.seq_length_for(arch)
        arch.check_sliding_window(seq_length, "--seq-length")
        if parallel.sequence_parallel and seq_length % tp:
            raise MegalongError(f"--sequence-parallel: seq-length {seq_length} must be divisible "
                                f"by tensor-model-parallel-size {tp}")
        check_short_under_cp(self.attention, parallel.context_parallel_size, "--attention")
        validate_context_parallel(seq_length, parallel.context_parallel_size,
                                  self.group_size_for(seq_length), tp=tp,
                                  sequence_parallel=parallel.sequence_parallel)
        check_interpolation_factor(self.rotary_seq_len_interpolation_factor)
        self.rope_for(arch)
        if self.transformer_impl == "transformer_engine" and not importable("transformer_engine"):
            raise MegalongError("--transformer-impl transformer_engine needs Transformer Engine, "
                                "which is not installed (pip install 'megalong[gpu]', GPU only); "
                                "use --transformer-impl local")


    def rope_for(self, arch: LlamaArch, recorded_factor: Optional[float] = None):
        """(arch with the YaRN the flags choose, linear interpolation factor or None) for a
        model whose checkpoint recorded `recorded_factor`; YaRN and linear interpolation
        together, or YaRN flags that change nothing, are refused."""
        yarn_flags = {name: getattr(self, name) for name in YARN_FLAGS
                      if getattr(self, name) is not None}
        given = ", ".join("--" + name.replace("_", "-") for name in yarn_flags)
        if self.rope_type == "yarn" and arch.llama3_rope is not None:
            raise MegalongError("--rope-type yarn: the model already scales RoPE by Llama-3's "
                                "llama3 rope type; YaRN on top of it is not supported")
        if self.rope_type == "rope" and arch.yarn_rope is not None:
            raise MegalongError("--rope-type rope: the model's config uses YaRN "
                                f"({arch.yarn_rope}); keep it (leave out --rope-type)")
        if self.rope_type != "yarn" and yarn_flags:
            raise MegalongError(f"{given} need --rope-type yarn")
        if self.rope_type == "yarn" and arch.yarn_rope is not None and yarn_flags:
            raise MegalongError(f"{given}: the model's config already sets YaRN "
                                f"({arch.yarn_rope}); its parameters cannot be changed")
        if self.rope_type == "yarn" and arch.yarn_rope is None:
            arch = arch.with_(yarn_rope=yarn_from_flags(
                factor=self.yarn_rotary_scaling_factor, original=arch.max_position_embeddings,
                seq_length=self.seq_length_for(arch), beta_fast=self.yarn_beta_fast,
                beta_slow=self.yarn_beta_slow, mscale=self.yarn_mscale,
                mscale_all_dim=self.yarn_mscale_all_dim))
        if arch.yarn_rope is not None:
            flag = self.rotary_seq_len_interpolation_factor
            if flag is not None or recorded_factor is not None:
                where = ("--rotary-seq-len-interpolation-factor" if flag is not None
                         else "the checkpoint's")
                raise MegalongError(f"YaRN cannot be combined with linear interpolation "
                                    f"({where} factor {flag or recorded_factor:g}); use one "
                                    "of them")
            return arch, None
        factor = self.rotary_seq_len_interpolation_factor or default_interpolation_factor(
            self.seq_length_for(arch), arch.max_position_embeddings, recorded_factor)
        return arch, factor


YARN_FLAGS = ("yarn_rotary_scaling_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale",
              "yarn_mscale_all_dim")


class GroupSizeError(MegalongError, ValueError):
    """Sequence length and S²-Attn group size do not fit together."""


def check_group_size(seq_length: int, group_size: int, source: Optional[str] = None) -> None:
    """The one S²-Attn group-size rule: 2 <= G <= N, G even (shifted heads move groups by G/2)
    and N % G == 0; else a GroupSizeError naming N, G (and `source`, the flags G came from)."""
    where = f" ({source})" if source else ""
    if group_size < 2 or group_size > seq_length:
        raise GroupSizeError(f"S²-Attn group size {group_size}{where} must be between 2 and "
                             f"seq-length {seq_length}")
    if group_size % 2:
        raise GroupSizeError(f"S²-Attn group size {group_size}{where} must be even: shifted "
                             f"heads move groups by half a group")
    if seq_length % group_size:
        raise GroupSizeError(
            f"seq-length {seq_length} is not a multiple of group size {group_size}{where}; "
            f"use a seq-length divisible by {group_size}, e.g. "
            f"{seq_length // group_size * group_size or group_size}")


def resolve_group_size(seq_length: int, group_size=None, ratio: float = 0.25) -> int:
    """G from --group-size or --group-size-ratio, checked by check_group_size."""
    if group_size is None:
        group_size = int(round(seq_length * ratio))
        source = f"group-size-ratio {ratio} of seq-length {seq_length}"
    else:
        source = f"group-size {group_size}"
    check_group_size(seq_length, group_size, source)
    return group_size


def check_short_under_cp(pattern: str, cp: int, flag: str) -> None:
    """The "short" pattern is an ablation; its context-parallel halo is not worth having."""
    if pattern == "short" and cp > 1:
        raise MegalongError(f"{flag} short is an ablation pattern and is not supported under "
                            f"context parallel (--context-parallel-size {cp}); use s2 or full")


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
    if package is not None and not importable(package):
        raise MegalongError(f"--attention-kernel {kernel} needs {package}, which is not "
                            "installed; use --attention-kernel sdpa or auto")


def check_interpolation_factor(factor, what: str = "--rotary-seq-len-interpolation-factor"):
    """The one rule for a linear RoPE interpolation factor (a flag's or a config.json's): None,
    or a finite number >= 1 (positions are compressed, never stretched). Returns it as a float."""
    if factor is None:
        return None
    if (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor)
            or factor < 1):
        raise MegalongError(f"{what} must be >= 1, got {factor!r}")
    return float(factor)


def default_interpolation_factor(seq_length, original_length, recorded=None):
    """LongLoRA's released models use ceil(target / original) (25 for 100k on Llama-2)."""
    if recorded is not None:
        return recorded
    if seq_length and seq_length > original_length:
        return float(math.ceil(seq_length / original_length))
    return None


def importable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True, kw_only=True)
class EvalAttention:
    """The attention an evaluation runs (tools/eval_ppl.py --eval-attention): dense ("full", the
    default and what users deploy), or a training pattern ("s2", "short") with G = group_size,
    or group_size_ratio of each evaluated length."""

    pattern: str = "full"
    group_size: Optional[int] = None
    group_size_ratio: float = 0.25

    def group_size_at(self, seq_length: int) -> Optional[int]:
        if self.pattern not in GROUPED_PATTERNS:
            return None
        return resolve_group_size(seq_length, self.group_size, self.group_size_ratio)

    def validate(self, seq_lengths) -> None:
        """Every evaluated length fits the groups (GroupSizeError names the length)."""
        if self.pattern not in ATTENTION_PATTERNS:
            raise MegalongError(f"eval attention must be one of {ATTENTION_PATTERNS}, "
                                f"got {self.pattern!r}")
        for seq_length in seq_lengths:
            self.group_size_at(seq_length)

    def model_options(self) -> dict:
        """ModelOptions fields of the eval model (build.load_model's keywords)."""
        if self.pattern not in GROUPED_PATTERNS:
            return {}
        ratio = None if self.group_size else self.group_size_ratio
        return {"eval_attention": self.pattern, "group_size": self.group_size,
                "group_size_ratio": ratio}

    def describe(self) -> str:
        if self.pattern not in GROUPED_PATTERNS:
            return "dense"
        groups = f"G={self.group_size}" if self.group_size else f"G={self.group_size_ratio:g}N"
        return f"{'S2-Attn' if self.pattern == 's2' else 'short (unshifted groups)'}, {groups}"
