"""Device and distributed bring-up. The ONLY place that adapts megatron-core to CPU.

megatron-core 0.16 assumes CUDA in a handful of places (DESIGN.md §3). On a machine without a
GPU, `adapt_megatron_to_cpu()` meets them once per process:
- `device="cuda"` literals and `torch.cuda.current_device()` used as an allocation device are
  rewritten to CPU by a TorchFunctionMode (loss accumulators in the schedules, default masks,
  dist_checkpointing exchange buffers, optimizer scale tensors);
- `torch.cuda.synchronize` becomes a no-op (dist_checkpointing preload, PP p2p);
- megatron's RNG tracker and the recompute RNG save/restore use the CPU generator.
With a GPU none of this is installed and megatron-core runs as shipped.
`keep_freed_memory()` is the CPU counterpart of CUDA's caching allocator, for training loops.
"""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from megalong.config.parallel import ParallelConfig
from megalong.device_policy import cpu_forced
from megalong.errors import MegalongError

_CPU_ADAPTED = False


def use_cuda() -> bool:
    """The device decision (device_policy.py): CUDA when torch sees a GPU, unless
    MEGALONG_DEVICE=cpu. Model building, checkpoints and logging ask this, never torch.cuda."""
    return not cpu_forced() and torch.cuda.is_available()


def device_type() -> str:
    return "cuda" if use_cuda() else "cpu"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


# ---------------------------------------------------------------- CPU adaptation of megatron-core


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    # A bare int is a CUDA ordinal (what torch.cuda.current_device() returns).
    return isinstance(value, int) and not isinstance(value, bool)


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA placements to CPU: device= kwargs, Tensor.cuda(), Tensor.to('cuda').
    `Tensor.type()` names CPU tensors as CUDA ones: megatron's optimizers assert/branch on
    'torch.cuda.FloatTensor' to mean "a float32 tensor on the training device"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *_args, **_kwargs):
    torch.set_rng_state(new_state)


def _make_cpu_rng_tracker():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's tracker on the CPU generator, with the same add()/fork() contract."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker()


def adapt_megatron_to_cpu() -> None:
    """Idempotent; call before building megatron modules on a machine without CUDA."""
    global _CPU_ADAPTED
    if _CPU_ADAPTED:
        return
    import warnings

    from megatron.core.tensor_parallel import random as mp_random

    # CUDA stream advice from megatron's TP linears; there are no streams on CPU.
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    # Recompute (CheckpointFunction) saves/restores "cuda" RNG state through these two.
    mp_random._get_cuda_rng_state = _cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    mp_random._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # The mode stays pushed for the life of the process, covering every later megatron call.
    _CudaToCpu().__enter__()
    _CPU_ADAPTED = True


# glibc malloc settings that keep freed memory: tunable name -> (mallopt parameter from malloc.h,
# value). The trim threshold is a C int for mallopt, so 2 GiB - 1 is its ceiling.
_KEEP_FREED = {"mmap_max": (-4, 0), "trim_threshold": (-1, 2**31 - 1)}
# The same settings for a process started with GLIBC_TUNABLES (benchmarks/train_step.py).
KEEP_FREED_GLIBC_TUNABLES = ":".join(
    f"glibc.malloc.{name}={value}" for name, (_, value) in _KEEP_FREED.items())


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of handing them back to the kernel.

    By default every block over 32 MiB (an activation at long context, a logits chunk) is a
    fresh mmap, returned on free, so each training step pays a page fault and a kernel zeroing
    for every 4 KiB it touches again (the measurement: docs/perf_log.md). Serving big blocks from
    the heap and never trimming it reuses them, as CUDA's caching allocator does on GPUs; the
    resident set stays at its high-water mark. For loops that reallocate the same tensors
    (training), not one-pass work such as conversion, where a heap fragmented by thousands of
    differently sized weights could raise the peak. False where the C library is not glibc
    (the default stays)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in _KEEP_FREED.values())


# ---------------------------------------------------------------- distributed bring-up


def init_distributed(
    parallel: ParallelConfig = ParallelConfig(), *, seed: int = 1234, timeout_s: float = 600.0
) -> None:
    """torch.distributed from the torchrun environment (or a 1-process group without it),
    then megatron-core's parallel_state and RNG seeds. Calling it again re-lays out the same ranks."""
    from megatron.core import parallel_state

    if not use_cuda():
        adapt_megatron_to_cpu()
    _checkpoint_writer_exits_with_us()
    _checkpoint_without_output_fp8_off()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if use_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # On GPUs, CPU tensors (loss sums, exit flags) still get collectives: gloo beside nccl.
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if use_cuda() else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel.data_parallel_size(dist.get_world_size())  # the world splits into these groups
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()  # re-laying out the same ranks (tests, tools)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        # megatron's TP/PP/DP/CP groups: the same timeout as the world group (its default is 30).
        distributed_timeout_minutes=timeout_s / 60.0,
    )
    if use_cuda() and parallel.context_parallel_size > 1:
        _create_context_parallel_communicator()
    seed_everything(seed)


def _create_context_parallel_communicator() -> None:
    """NCCL creates a group's communicator lazily, at its first CUDA operation, and when that
    operation is a `batch_isend_irecv` every rank of the group must take part (torch's note on
    it). The halo exchange skips ranks with nothing to send or receive (TP >= 2, CP >= 3,
    L % G == G/2), so its first call could leave the others waiting: one tiny all-reduce on the
    CP group creates the communicator first. (A barrier would not: under the mixed
    `cpu:gloo,cuda:nccl` backend it goes to gloo. Passing `device_id` to init_process_group
    would create every group's communicator eagerly, at a memory cost not measured here.)"""
    from megatron.core import parallel_state

    dist.all_reduce(torch.zeros(1, device=device()),
                    group=parallel_state.get_context_parallel_group())


# ---------------------------------------------------------------- distributed hygiene


def _checkpoint_writer_exits_with_us() -> None:
    """dist_checkpointing collects its file writers' results through a multiprocessing manager,
    a spawned server process that it starts at the first save and never stops. Started here the
    same way, except that the server dies with this process: a rank killed by SIGKILL (OOM
    killer, a failed node's neighbours) otherwise leaves it running forever, holding the job's
    stdout/stderr open so a launcher or `| tee` waiting for them never finishes."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def write_results_queue():
        if filesystem_async._results_queue is None:
            import multiprocessing
            from multiprocessing.managers import SyncManager

            from megalong.child_processes import exit_with_parent

            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
            filesystem_async._results_queue = manager.Queue()  # the proxy keeps manager alive
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = write_results_queue


def _checkpoint_without_output_fp8_off() -> None:
    """megatron-core 0.16's CheckpointWithoutOutput (selective recompute of the layernorms)
    sets `self.fp8 = fp8 is not None`, so its default fp8=False reads as FP8 on, and its forward
    then calls Transformer Engine's FP8GlobalStateManager, a NameError where TE is absent. Here
    False means off, as None does. Written for 0.16; later versions are left alone."""
    import megatron.core
    from megatron.core.tensor_parallel import random as mp_random

    cls = mp_random.CheckpointWithoutOutput
    if not megatron.core.__version__.startswith("0.16.") or getattr(cls, "_megalong_fp8_fix", False):
        return
    original_init = cls.__init__

    def __init__(self, fp8=False):
        original_init(self, None if fp8 is False else fp8)

    cls.__init__ = __init__
    cls._megalong_fp8_fix = True


def check_ranks_agree(settings: dict, what: str = "configuration") -> None:
    """Collective: every rank must hold the same `settings` (e.g. the parsed flags), else every
    rank raises the same error naming the first flags that differ. Costs one all-gather of a
    64-bit hash; the full settings are gathered only when the hashes differ."""
    import hashlib
    import json

    world = dist.get_world_size()
    if world == 1:
        return
    text = json.dumps(settings, sort_keys=True, default=repr)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64, device=device())
    hashes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(hashes, mine)
    if len({int(h.item()) for h in hashes}) == 1:
        return
    everyone = [None] * world
    dist.all_gather_object(everyone, json.loads(text))
    reference = everyone[0]
    for rank, other in enumerate(everyone):
        differing = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
        if differing:
            shown = "; ".join(f"--{k.replace('_', '-')} {reference.get(k)!r} on rank 0 but "
                              f"{other.get(k)!r} on rank {rank}" for k in differing[:3])
            more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
            raise MegalongError(f"the ranks disagree on the {what}: {shown}{more}; launch every "
                                "rank (every node) with the same flags")


_DISTRIBUTED_FAILURE = ("timed out", "timeout", "connection closed", "connection reset",
                        "broken pipe", "nccl", "gloo", "socket")


@contextlib.contextmanager
def distributed_failures_as_errors(timeout_minutes: float):
    """A collective that fails because another rank died or hangs (gloo/NCCL errors, timeouts)
    becomes one line naming the cause, instead of a traceback from deep inside torch; the
    launcher (torchrun) then stops the remaining ranks. Other exceptions pass unchanged."""
    try:
        yield
    except MegalongError:
        raise
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        if not (isinstance(err, dist.DistError)
                or any(word in first.lower() for word in _DISTRIBUTED_FAILURE)):
            raise
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        raise MegalongError(
            f"rank {rank}: a collective operation failed ({first}): another rank died or stopped "
            f"responding (its own log names the cause); collectives wait at most "
            f"--distributed-timeout-minutes {timeout_minutes:g}") from err


def seed_everything(seed: int) -> None:
    """As megatron's model_parallel_cuda_manual_seed: the default and data-parallel streams
    share `seed`; the tensor-parallel stream differs per TP rank."""
    import random

    import numpy as np
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if use_cuda():
        mp_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(
        mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
        seed + 2718 + parallel_state.get_tensor_model_parallel_rank(),
    )
    tracker.add(
        mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
        seed + 1024 + 100 * parallel_state.get_expert_model_parallel_rank()
        + parallel_state.get_expert_tensor_parallel_rank(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
