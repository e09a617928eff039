"""Entry point of examples/pretrain_longlora.py: flags, validation before torch, then train()."""

import argparse
import os
import sys

from megalong import config
from megalong.errors import MegalongError
from megalong.model.arch import PRESETS, LlamaArch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LongLoRA context extension on megatron-core. Launch with torchrun "
                    "(examples/pretrain_longlora.sh) or as one process on CPU.",
        allow_abbrev=False)
    config.add_model_args(parser)
    config.add_training_args(parser)
    config.add_lora_args(parser)
    return parser


def parse_and_validate(argv=None):
    """Parses and checks every flag (and the --load metadata) without importing torch."""
    args = build_parser().parse_args(argv)
    if args.load:
        from megalong.checkpoint_manifest import select_iteration
        from megalong.checkpoint_meta import read_metadata

        # A missing or truncated file (sizes against the manifest) is caught here, before torch;
        # load_checkpoint checks the CRC-32s. --load-fallback picks an older intact iteration.
        args.load_iteration = select_iteration(args.load, fallback=args.load_fallback, log=_log)
        metadata = read_metadata(args.load, args.load_iteration)
        arch = LlamaArch(**metadata["arch"])
    elif args.model:
        arch = PRESETS[args.model]
    else:
        raise MegalongError("give --load (a converted checkpoint) or --model (a preset, random init)")
    config.validate_model_args(args, arch)
    config.validate_training_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    config.validate_lora_args(args)
    if args.load:
        config.check_lora_fits_checkpoint(args, metadata, args.load)
    check_tokenizer_fits(args, arch)
    return args


def _log(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[megalong] {message}", file=sys.stderr, flush=True)


def check_tokenizer_fits(args, arch) -> None:
    from megalong.training.tokenizer_check import load_checked_tokenizer

    load_checked_tokenizer(args, arch)


def main(argv=None) -> list[float]:
    args = parse_and_validate(argv)
    from megalong.training.loop import train

    return train(args)
