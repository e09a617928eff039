"""Passkey retrieval (LongLoRA-style): a random 5-digit key hidden at a chosen depth in repeated
filler text; greedy decoding with the KV cache; correct only on an exact match of the digits.
Sweeps prompt lengths x depths with N trials each, at any TP/PP.

  passkey.py --load CKPT | --hf-dir DIR  --lengths 1024,2048,4096  [--depths 0,0.25,0.5,0.75,1]
             [--trials 5] [--tokenizer TOK] [--json OUT] [--plot heatmap.png]

Prints accuracy per length and the depth x length grid as Markdown tables.
"""

import argparse
import os
import sys

from megalong.cli import model_args
from megalong.data.tokenizer import load_tokenizer
from megalong.errors import MegalongError, run_cli
from megalong.eval.passkey import fit_passkey_prompt
from megalong.eval.report import passkey_markdown, plot_passkey, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args.add_model_args(parser)
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--lengths", type=model_args.number_list(int), required=True,
                       help="comma-separated prompt lengths in tokens")
    sweep.add_argument("--depths", type=model_args.number_list(float), default=[0.0, 0.25, 0.5, 0.75, 1.0],
                       help="comma-separated key depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    sweep.add_argument("--trials", type=int, default=5, help="random keys per length and depth")
    sweep.add_argument("--seed", type=int, default=666, help="seed of the keys")
    sweep.add_argument("--tokenizer", default=None,
                       help="sentencepiece model or HF tokenizer dir (default: the model's own)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    out.add_argument("--plot", default=None, metavar="OUT.png", help="depth x length heat map")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def validate(args):
    model_args.check_positive("trials", args.trials)
    bad = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad:
        raise MegalongError(f"--depths must lie in [0, 1], got {bad}")
    if len(set(args.depths)) != len(args.depths) or len(set(args.lengths)) != len(args.lengths):
        raise MegalongError("--lengths and --depths must not repeat a value")
    source = model_args.source_from_args(args)
    tokenizer = model_args.tokenizer_path(source, args.tokenizer)
    loaded = load_tokenizer(tokenizer)
    if loaded.vocab_size > source.arch.vocab_size:
        raise MegalongError(f"tokenizer {tokenizer} has {loaded.vocab_size} tokens, more than the "
                            f"model's vocabulary of {source.arch.vocab_size}")
    for length in args.lengths:  # fails early, naming the shortest usable length
        fit_passkey_prompt(loaded.encode, length, 0.5, "12345",
                           extra_tokens=int(loaded.bos_id is not None))
    model_args.check_output_file("json", args.json)
    model_args.check_output_file("plot", args.plot)
    return source, tokenizer


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    source, tokenizer = validate(args)
    from megalong.eval.runs import passkey_on_ranks, run_on_model_ranks  # torch from here on

    report = run_on_model_ranks(source, passkey_on_ranks, source, tokenizer, args.lengths,
                                args.depths, args.trials, args.seed, not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(passkey_markdown(report))
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot_passkey(report, args.plot)


def console() -> None:
    sys.exit(run_cli(main))
