"""Seeds: Python, numpy, torch and megatron's tensor-parallel RNG tracker."""

from megalong import runtime


def seed_everything(seed: int) -> None:
    """As megatron's model_parallel_cuda_manual_seed: the default and data-parallel streams
    share `seed`; the tensor-parallel stream differs per TP rank."""
    import random

    import numpy as np
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if runtime.use_cuda():
        mp_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mp_random.get_cuda_rng_tracker()  # the CPU tracker (patches.cpu_rng_tracker)
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
