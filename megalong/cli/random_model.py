"""Write a randomly initialised Llama as an HF checkpoint directory (for demos and benchmarks)."""

import argparse
import os
import sys

from megalong.atomic import check_out_dir
from megalong.config.arch import PRESETS
from megalong.data.files import check_writable_dir
from megalong.errors import MegalongError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(PRESETS), required=True, help="architecture preset")
    parser.add_argument("--out", required=True, help="HF directory to write (created atomically)")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--std", type=float, default=0.02, help="weight init std (default 0.02)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    arch = PRESETS[args.model]
    if args.vocab_size is not None:
        if args.vocab_size < 2:
            raise MegalongError(f"--vocab-size must be >= 2, got {args.vocab_size}")
        arch = arch.with_(vocab_size=args.vocab_size)
    if not args.std > 0:
        raise MegalongError(f"--std must be > 0, got {args.std}")
    check_out_dir(args.out, args.overwrite, what="--out")
    check_writable_dir(os.path.dirname(os.path.abspath(args.out)), what=f"--out {args.out}: directory")
    from megalong.convert.random_hf import write_random_hf_model

    write_random_hf_model(args.out, arch, seed=args.seed, std=args.std, overwrite=args.overwrite)
    print(f"wrote a random {args.model} to {args.out}", file=sys.stderr)


def console() -> None:
    sys.exit(run_cli(main))
