"""The model an evaluation runs on: `--load CKPT` or `--hf-dir DIR`, resolved without torch (so
CLIs reject bad input before start-up), then built on the ranks with dense attention.

    source = resolve_model_source(load=..., hf_dir=..., tp=2, pp=1)   # torch-free checks
    result = run_on_model_ranks(source, fn, *args)  # fn(*args) on tp*pp ranks; rank 0's result
    model = build_eval_model(source, seq_length)     # inside fn, after init_eval_runtime(source)

Under torchrun the current process is one of the ranks (and ranks beyond tp*pp are data
parallel); otherwise tp*pp local gloo ranks are spawned (one rank runs in this process).
"""

import argparse
import os
from typing import Optional

from megalong.data.tokenizer import check_tokenizer_path
from megalong.source import ModelSource, resolve_model_source
from megalong.errors import MegalongError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--load", metavar="CKPT", help="megalong checkpoint directory (its latest "
                       "iteration; LoRA adapters are merged after loading)")
    which.add_argument("--hf-dir", metavar="DIR", help="HF LlamaForCausalLM directory")
    group.add_argument("--rotary-seq-len-interpolation-factor", type=float, default=None,
                       help="linear RoPE position interpolation factor (default: the checkpoint's, "
                            "or config.json's rope_scaling/rope_parameters)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)


def source_from_args(args) -> ModelSource:
    return resolve_model_source(
        load=args.load, hf_dir=args.hf_dir, tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        interpolation_factor=args.rotary_seq_len_interpolation_factor)


def tokenizer_path(source: ModelSource, explicit: Optional[str]) -> str:
    """--tokenizer, else the tokenizer stored with the model; a clear error without either."""
    if explicit:
        check_tokenizer_path(explicit)
        return explicit
    if source.tokenizer is None:
        raise MegalongError(f"{source.path} holds no tokenizer files; pass --tokenizer "
                            "(a sentencepiece tokenizer.model or an HF tokenizer directory)")
    return source.tokenizer


def check_positive(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise MegalongError(f"--{name} must be >= {minimum}, got {value}")


def check_output_file(flag: str, path: Optional[str]) -> None:
    """An output file's directory exists (or can be created) and is writable."""
    if path is None:
        return
    from megalong.data.files import check_writable_dir

    if os.path.isdir(path):
        raise MegalongError(f"--{flag} {path} is a directory; give a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what=f"--{flag} directory")


# ---------------------------------------------------------------- on the ranks (torch from here)


def init_eval_runtime(source: ModelSource, seed: int = 1234) -> None:
    from megalong import runtime

    runtime.apply_patches("eval")  # megatron-core's notices that say nothing about an eval run

    runtime.init_distributed(source.parallel, seed=seed)


def build_eval_model(source: ModelSource, seq_length: int):
    """This rank's stage of the model, weights loaded (LoRA adapters merged), dense attention,
    eval mode."""
    from megalong.build import load_model

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
                from megalong import runtime

                runtime.shutdown()
    from megalong.spawn import run_on_ranks

    return run_on_ranks(fn, world, *args, timeout_s=timeout_s)[0]
