"""Device and distributed bring-up. The ONLY place that adapts megatron-core to CPU.

megatron-core 0.16 assumes CUDA in a handful of places (DESIGN.md §3). On a machine without a
GPU, `adapt_megatron_to_cpu()` meets them once per process:
- `device="cuda"` literals and `torch.cuda.current_device()` used as an allocation device are
  rewritten to CPU by a TorchFunctionMode (loss accumulators in the schedules, default masks,
  dist_checkpointing exchange buffers, optimizer scale tensors);
- `torch.cuda.synchronize` becomes a no-op (dist_checkpointing preload, PP p2p);
- megatron's RNG tracker and the recompute RNG save/restore use the CPU generator.
With a GPU none of this is installed and megatron-core runs as shipped.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalong.errors import MegalongError

_CPU_ADAPTED = False


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("MEGALONG_DEVICE", "") != "cpu"


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


# ---------------------------------------------------------------- distributed bring-up


@dataclass(frozen=True)
class ParallelSizes:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1

    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context


def init_distributed(
    sizes: ParallelSizes = ParallelSizes(), *, seed: int = 1234, timeout_s: float = 600.0
) -> None:
    """torch.distributed from the torchrun environment (or a 1-process group without it),
    then megatron-core's parallel_state and RNG seeds. Calling it again re-lays out the same ranks."""
    from megatron.core import parallel_state

    if not use_cuda():
        adapt_megatron_to_cpu()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if use_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if use_cuda() else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world = dist.get_world_size()
    if world % sizes.model_parallel() != 0:
        raise MegalongError(
            f"world size {world} is not divisible by tensor({sizes.tensor}) x "
            f"pipeline({sizes.pipeline}) x context({sizes.context}) parallel sizes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()  # re-laying out the same ranks (tests, tools)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        context_parallel_size=sizes.context,
    )
    seed_everything(seed)


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
