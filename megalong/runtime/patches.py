"""EVERY patch megalong makes to megatron-core or torch, each a small named function whose
docstring's first line is its reason, registered in `PATCHES` (DESIGN.md §3).

Each was written against one megatron-core series (`WRITTEN_FOR`; setup.py pins it). Applying a
patch under another version warns that it may no longer hold, or raises `MegalongError` where it
would silently misbehave (`other_versions="raise"`), or leaves it out where the version no longer
needs it ("skip"). The version is megatron's own `megatron.core.package_info.__version__`.

Groups, applied explicitly (nothing here acts at import):
- "import": warning filters for notices megatron gives while it is imported, applied when
  `megalong` itself is imported (megalong/__init__.py) and again before the data modules import
  megatron; their version is checked with the rest at bring-up (reading it imports torch);
- "bring-up": every device, by `apply_patches()` (init_distributed, and model configs built
  without it: model/llama.py);
- "cpu": the CPU adaptation (`adapt_megatron_to_cpu()`), by `apply_patches()` when no GPU is used;
- "eval": evaluation runs' quieter log (eval/runs.py);
- "model": patches that take megalong's module to install, called by the model code itself.
This module imports neither torch nor megatron at its top: the import group runs before them.
"""

import functools
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

from megalong import runtime
from megalong.child_processes import exit_with_parent
from megalong.errors import MegalongError


WRITTEN_FOR = "0.16"  # the megatron-core series every patch below was read against
GROUPS = ("import", "bring-up", "cpu", "eval", "model")


@dataclass(frozen=True)
class Patch:
    name: str
    group: str
    reason: str  # the docstring's first line
    written_for: str  # megatron-core series ("0.16": any 0.16.x)
    other_versions: str  # "warn" | "raise" | "skip"
    fn: Callable


PATCHES: dict[str, Patch] = {}
_APPLIED: set[str] = set()
_CHECKED: set[str] = set()  # import-group patches whose version has been checked
_WARNED: set[str] = set()


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def written_for(patch: Patch, version: str) -> bool:
    return version == patch.written_for or version.startswith(patch.written_for + ".")


def check_version(patch: Patch) -> bool:
    """Whether to apply `patch` under the installed megatron-core (see the module's docstring)."""
    version = megatron_version()
    if written_for(patch, version):
        return True
    where = (f"megalong's patch {patch.name} (megalong/runtime/patches.py) was written for "
             f"megatron-core {patch.written_for}.x, and {version} is installed")
    if patch.other_versions == "raise":
        raise MegalongError(f"{where}: it would misbehave silently there ({patch.reason}); "
                            f"install megatron-core {patch.written_for}.x (setup.py pins it)")
    if patch.name not in _WARNED:
        _WARNED.add(patch.name)
        done = "left out" if patch.other_versions == "skip" else "applied; check it still holds"
        warnings.warn(f"{where}: {done} ({patch.reason})", stacklevel=3)
    return patch.other_versions != "skip"


def _patch(group: str, *, other_versions: str = "warn", written_for: str = WRITTEN_FOR):
    """Registers a patch function in PATCHES. The returned function checks the version (not in
    the import group) and applies a patch without arguments once per process (the import group's
    warning filters are idempotent and may be applied again)."""
    assert group in GROUPS and other_versions in ("warn", "raise", "skip")

    def register(fn):
        reason = (fn.__doc__ or "").strip().split("\n")[0]
        patch = Patch(fn.__name__, group, reason, written_for, other_versions, fn)
        PATCHES[patch.name] = patch

        @functools.wraps(fn)
        def apply(*args, **kwargs):
            once = group != "import" and not args and not kwargs
            if once and patch.name in _APPLIED:
                return None
            result = fn(*args, **kwargs) if group == "import" or check_version(patch) else None
            if once:
                _APPLIED.add(patch.name)
            return result

        return apply

    return register


def apply_patches(group: str = "bring-up") -> None:
    """Apply a group's patches without arguments, in table order. "bring-up" (the default) also
    applies the "cpu" group when no GPU is used, and checks the import group's version."""
    assert group in GROUPS
    if group == "bring-up":
        for patch in _group("import"):  # applied before megatron was imported: checked now
            if patch.name not in _CHECKED:
                check_version(patch)
                _CHECKED.add(patch.name)
        if not runtime.use_cuda():
            apply_patches("cpu")
    for patch in _group(group):
        globals()[patch.name]()


def adapt_megatron_to_cpu() -> None:
    """Idempotent; call before building megatron modules on a machine without CUDA."""
    apply_patches("cpu")


def _group(group: str) -> list[Patch]:
    return [patch for patch in PATCHES.values() if patch.group == group]


# ---------------------------------------------------------------- import: warning filters


@_patch("import")
def quiet_missing_apex_te() -> None:
    """megatron-core warns at its import that apex/TE are absent; they are optional (DESIGN.md §3)."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


@_patch("import")
def quiet_sharded_tensor_deprecations() -> None:
    """torch's deprecation notices for the ShardedTensor API that dist_checkpointing still uses."""
    warnings.filterwarnings("ignore", message=".*Please use DTensor instead.*")
    warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*")


@_patch("import")
def quiet_cuda_graph_scope_deprecation() -> None:
    """TransformerConfig's default cuda_graph_scope triggers its own deprecation notice."""
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")


# ---------------------------------------------------------------- bring-up: every device


class _SwiGLUMLPIsAnMLP(logging.Filter):
    def filter(self, record):
        return "Unknown MLP type" not in record.getMessage()


_SWIGLU_MLP_IS_AN_MLP = _SwiGLUMLPIsAnMLP()


@_patch("bring-up")
def quiet_unknown_mlp_type() -> None:
    """megatron's TransformerLayer warns "Unknown MLP type" once per layer for SwiGLUMLP, an MLP.

    It passes tp_group only when the MLP spec's module is its own MLP class and warns for any
    other. Without tp_group SwiGLUMLP takes the global TP group, the one megatron passes
    (megalong builds every model on the global parallel state), so the warning says nothing."""
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        _SWIGLU_MLP_IS_AN_MLP)


@_patch("bring-up", other_versions="raise")
def checkpoint_writer_exits_with_us() -> None:
    """dist_checkpointing's writer-result manager (a spawned server) must die with its rank.

    dist_checkpointing collects its file writers' results through a multiprocessing manager,
    a spawned server process that it starts at the first save and never stops. Started here the
    same way, except that the server dies with this process: a rank killed by SIGKILL (OOM
    killer, a failed node's neighbours) otherwise leaves it running forever, holding the job's
    stdout/stderr open so a launcher or `| tee` waiting for them never finishes. It replaces a
    private function whole: another version's could do more, silently lost."""
    import os

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_get_write_results_queue"):
        raise MegalongError("megatron-core's dist_checkpointing has no _get_write_results_queue "
                            "(runtime/patches.py:checkpoint_writer_exits_with_us)")

    def write_results_queue():
        if filesystem_async._results_queue is None:
            import multiprocessing
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
            filesystem_async._results_queue = manager.Queue()  # the proxy keeps manager alive
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = write_results_queue


@_patch("bring-up", other_versions="skip")
def checkpoint_without_output_fp8_off() -> None:
    """megatron-core 0.16's CheckpointWithoutOutput reads its default fp8=False as FP8 on.

    Its __init__ sets `self.fp8 = fp8 is not None`, and its forward (selective recompute of the
    layernorms) then calls Transformer Engine's FP8GlobalStateManager, a NameError where TE is
    absent. Here False means off, as None does. Later versions are left alone."""
    from megatron.core.tensor_parallel import random as mp_random

    cls = mp_random.CheckpointWithoutOutput
    if getattr(cls, "_megalong_fp8_fix", False):
        return
    original_init = cls.__init__

    def __init__(self, fp8=False):
        original_init(self, None if fp8 is False else fp8)

    cls.__init__ = __init__
    cls._megalong_fp8_fix = True


# ---------------------------------------------------------------- cpu: megatron without CUDA
# megatron-core 0.16 assumes CUDA in a handful of places (DESIGN.md §3); with a GPU none of
# these is installed and megatron-core runs as shipped.


@_patch("cpu")
def quiet_cuda_device_max_connections() -> None:
    """CUDA stream advice from megatron's TP linears; there are no streams on CPU."""
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")


@_patch("cpu")
def cuda_device_calls_on_cpu() -> None:
    """torch.cuda.current_device() is "cpu" (an allocation device) and synchronize a no-op."""
    import torch

    # current_device: allocation devices in megatron; synchronize: dist_checkpointing preload, PP p2p.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None


@_patch("cpu")
def cuda_rng_state_on_cpu() -> None:
    """torch's and megatron's CUDA RNG state get/set (recompute saves/restores it) use the CPU generator."""
    import torch
    from megatron.core.tensor_parallel import random as mp_random

    from megalong.runtime.cpu import cpu_rng_state, set_cpu_rng_state

    torch.cuda.get_rng_state = cpu_rng_state
    torch.cuda.set_rng_state = set_cpu_rng_state
    # Recompute (CheckpointFunction) saves/restores "cuda" RNG state through these two.
    mp_random._get_cuda_rng_state = cpu_rng_state
    mp_random._set_cuda_rng_state = set_cpu_rng_state


@_patch("cpu")
def cpu_rng_tracker() -> None:
    """megatron's RNG tracker on the CPU generator (same add/fork contract; seeded by seed_everything)."""
    from megatron.core.tensor_parallel import random as mp_random

    from megalong.runtime.cpu import make_cpu_rng_tracker

    mp_random._CUDA_RNG_STATE_TRACKER = make_cpu_rng_tracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


@_patch("cpu")
def cuda_placements_to_cpu() -> None:
    """device="cuda", CUDA ordinals, Tensor.cuda() and .to("cuda") in megatron go to the CPU."""
    from megalong.runtime.cpu import CudaToCpu

    # The mode stays pushed for the life of the process, covering every later megatron call.
    CudaToCpu().__enter__()


# ---------------------------------------------------------------- eval


@_patch("eval")
def quiet_eval_notices() -> None:
    """megatron-core's notices that say nothing about an evaluation run."""
    for message in (".*full scope is deprecated.*", ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
                    ".*all_gather_into_tensor.*is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)


# ---------------------------------------------------------------- model


@_patch("model", other_versions="raise")
def fill_fused_rope_slot(kernel) -> bool:
    """megatron leaves its fused-RoPE slot to TE; without TE, megalong's kernel (model/rope.py) fills it.

    megatron calls `rope_utils.fused_apply_rotary_pos_emb(t, freqs, interleaved=...)` when
    `apply_rope_fusion` is set; the kernel meets 0.16's call and drops TE-only arguments, which
    another version's call could need. True when the slot holds `kernel` (a kernel already there
    is TE's, which needs CUDA tensors)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = kernel
    return rope_utils.fused_apply_rotary_pos_emb is kernel
