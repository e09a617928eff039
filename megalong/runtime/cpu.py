"""What the CPU patches (patches.py) put in place of megatron's and torch's CUDA pieces. Only
patches.py installs them; this module imports torch and is loaded when they are applied."""

import contextlib

import torch


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    # A bare int is a CUDA ordinal (what torch.cuda.current_device() returns).
    return isinstance(value, int) and not isinstance(value, bool)


class CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA placements to CPU: device= kwargs, Tensor.cuda(), Tensor.to('cuda').
    `Tensor.type()` names CPU tensors as CUDA ones: megatron's optimizers assert/branch on
    'torch.cuda.FloatTensor' to mean "a float32 tensor on the training device". pin_memory=True
    (page-locked host buffers for CUDA copies: megatron's CP RoPE slicing, which YaRN's
    embedding runs while it is built) is dropped: CPU-only torch has no pinned allocator."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def cpu_rng_state(*_args, **_kwargs):
    return torch.get_rng_state()


def set_cpu_rng_state(new_state, *_args, **_kwargs):
    torch.set_rng_state(new_state)


def make_cpu_rng_tracker():
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
