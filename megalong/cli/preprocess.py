"""Tokenize text into a megatron-core IndexedDataset (.bin/.idx, readable by Megatron-LM too).

  preprocess_data.py --input data/*.jsonl --tokenizer tokenizer.model --output-prefix data/corpus

Inputs: .jsonl/.json (one document per record, text under --json-key), .parquet (the --json-key
column), anything else plain text (one document per file, or per paragraph with
--split-paragraphs). Each document ends with the tokenizer's EOS unless --no-append-eod.
Arguments are checked before the slow imports; the outputs appear only when complete.
"""

import argparse
import sys

from megalong.data.preprocess import preprocess_to_indexed, validate_preprocess
from megalong.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="input files or globs (.jsonl, .json, .parquet, or text)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX.bin and PREFIX.idx (the --data-path for training)")
    parser.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                        help="sentencepiece tokenizer.model, or a HF tokenizer directory")
    parser.add_argument("--json-key", default="text", help="record key / parquet column holding the text")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the EOS id to every document (default on)")
    parser.add_argument("--split-paragraphs", action="store_true",
                        help="make every blank-line-separated paragraph its own document")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    validate_preprocess(args.input, args.output_prefix, args.tokenizer, args.workers)
    result = preprocess_to_indexed(
        args.input, args.output_prefix, args.tokenizer, json_key=args.json_key, workers=args.workers,
        append_eod=args.append_eod, split_paragraphs=args.split_paragraphs,
    )
    print(f"wrote {result.output_prefix}.bin/.idx: {result.documents:,} documents, "
          f"{result.tokens:,} tokens ({result.dtype})", file=sys.stderr)


def console() -> None:
    sys.exit(run_cli(main))
