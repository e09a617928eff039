"""The ranks an evaluation runs on, and its model: a ModelSource (source.py, resolved without
torch by the CLI) built on the ranks with dense attention.

    result = run_on_model_ranks(source, fn, *args)  # fn(*args) on tp*pp ranks; rank 0's result
    model = build_eval_model(source, seq_length)     # inside fn, after init_eval_runtime(source)

Under torchrun the current process is one of the ranks (and ranks beyond tp*pp are data
parallel); otherwise tp*pp local gloo ranks are spawned (one rank runs in this process).
"""

import os

from megalong import runtime
from megalong.build import load_model
from megalong.source import ModelSource
from megalong.spawn import run_on_ranks


def init_eval_runtime(source: ModelSource, seed: int = 1234) -> None:
    runtime.apply_patches("eval")  # megatron-core's notices that say nothing about an eval run
    runtime.init_distributed(source.parallel, seed=seed)


def build_eval_model(source: ModelSource, seq_length: int):
    """This rank's stage of the model, weights loaded (LoRA adapters merged), dense attention,
    eval mode."""
    return load_model(source, seq_length=seq_length, merge_lora=True)


def run_on_model_ranks(source: ModelSource, fn, *args, timeout_s: float = 7 * 24 * 3600.0):
    """fn(*args) on the model's ranks; returns this process's result (under torchrun) or rank 0's.
    fn calls init_eval_runtime itself."""
    world = (source.parallel.tensor_model_parallel_size
             * source.parallel.pipeline_model_parallel_size)
    under_torchrun = "WORLD_SIZE" in os.environ
    if under_torchrun or world == 1:
        try:
            return fn(*args)
        finally:
            if not under_torchrun:
                runtime.shutdown()
    return run_on_ranks(fn, world, *args, timeout_s=timeout_s)[0]
