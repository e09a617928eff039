"""The model flags of the evaluation commands (eval-ppl, passkey, generate): `--load CKPT` or
`--hf-dir DIR` at a TP/PP layout, resolved and checked without torch; and their output checks."""

import argparse
import os
from typing import Optional

from megalong.config.parallel import ParallelConfig
from megalong.data.files import check_writable_dir
from megalong.data.tokenizer import check_tokenizer_path
from megalong.errors import MegalongError
from megalong.source import ModelSource, resolve_model_source


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


def number_list(kind):
    """An argparse type: comma-separated values of `kind` (at least one)."""
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def source_from_args(args) -> ModelSource:
    return resolve_model_source(
        load=args.load, hf_dir=args.hf_dir, parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size),
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
    if os.path.isdir(path):
        raise MegalongError(f"--{flag} {path} is a directory; give a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what=f"--{flag} directory")
