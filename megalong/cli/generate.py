"""Generate text with the megatron model: greedy (--temperature 0, the default) or top-p
sampling, with a KV cache, at any TP/PP (torchrun's ranks, or TP x PP local ranks spawned).

  generate.py --load CKPT | --hf-dir DIR  --prompt-file FILE  [--tokenizer TOK]
              [--max-new-tokens 64] [--temperature 0.8 --top-p 0.9] [--json OUT]

A text prompt file is one prompt; a .jsonl file holds one {"prompt": ...} per line. The tokenizer
defaults to the one stored with the model. Prints the completions and a Markdown table.
"""

import argparse
import os
import sys

from megalong.cli import model_args
from megalong.data.tokenizer import load_tokenizer
from megalong.errors import MegalongError, run_cli
from megalong.eval.generate import Sampling, read_prompts
from megalong.eval.report import generation_markdown, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args.add_model_args(parser)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt-file", required=True, help="text file (one prompt) or .jsonl")
    gen.add_argument("--tokenizer", default=None,
                     help="sentencepiece model or HF tokenizer dir (default: the model's own)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    gen.add_argument("--seed", type=int, default=1234, help="sampling seed")
    gen.add_argument("--no-kv-cache", action="store_true",
                     help="recompute the whole sequence every step (slow; for checking)")
    gen.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    gen.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    model_args.check_positive("max-new-tokens", args.max_new_tokens)
    sampling = Sampling(args.temperature, args.top_p, args.seed).validate()
    source = model_args.source_from_args(args)
    tokenizer = model_args.tokenizer_path(source, args.tokenizer)
    vocab = load_tokenizer(tokenizer).vocab_size
    if vocab > source.arch.vocab_size:
        raise MegalongError(f"tokenizer {tokenizer} has {vocab} tokens, more than the model's "
                            f"vocabulary of {source.arch.vocab_size}: they do not belong together")
    prompts = read_prompts(args.prompt_file)
    model_args.check_output_file("json", args.json)
    from megalong.eval.runs import generate_on_ranks, run_on_model_ranks  # torch from here on

    report = run_on_model_ranks(source, generate_on_ranks, source, tokenizer, prompts,
                                args.max_new_tokens, sampling, not args.no_kv_cache,
                                not args.no_bos)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for i, row in enumerate(report["outputs"]):
        print(f"### completion {i}\n{row['completion']}\n")
    print(generation_markdown(report))
    if args.json:
        write_json(args.json, report)


def console() -> None:
    sys.exit(run_cli(main))
