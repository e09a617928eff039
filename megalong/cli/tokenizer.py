"""Train a Llama-style sentencepiece tokenizer (BPE, byte fallback, unk=0, bos=1, eos=2).

  train_tokenizer.py --input corpus/*.txt --vocab-size 8000 --out tok/
  train_tokenizer.py --demo-text stdlib --vocab-size 2000 --out tok/   (text every Python has)

Inputs are read like tools/preprocess_data.py reads them (.jsonl/.json/.parquet records under
--json-key, anything else plain text). Writes OUT/tokenizer.model.
"""

import argparse
import sys

from megalong.data.demo_text import SOURCES, demo_documents
from megalong.data.files import check_writable_dir, expand_inputs
from megalong.data.preprocess import iter_documents
from megalong.data.tokenizer import load_tokenizer, train_sentencepiece
from megalong.errors import MegalongError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", default=[], metavar="FILE", help="input files or globs")
    parser.add_argument("--demo-text", nargs="?", const="topics", choices=SOURCES, default=None,
                        help="train on text shipped with Python (default source: topics)")
    parser.add_argument("--json-key", default="text", help="record key / parquet column holding the text")
    parser.add_argument("--vocab-size", type=int, required=True, help="number of pieces (>= 300)")
    parser.add_argument("--out", required=True, help="directory to write tokenizer.model into")
    parser.add_argument("--max-mb", type=float, default=None, help="use at most this many MB of text")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if not args.input and args.demo_text is None:
        raise MegalongError("give --input FILES or --demo-text")
    files = expand_inputs(args.input) if args.input else []
    check_writable_dir(args.out, "--out")
    max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)

    def texts():
        used = 0
        sources = [demo_documents(args.demo_text)] if args.demo_text else []
        sources += [iter_documents(path, args.json_key) for path in files]
        for source in sources:
            for text in source:
                if max_bytes is not None and used >= max_bytes:
                    return
                used += len(text.encode("utf-8"))
                yield text

    path = train_sentencepiece(texts(), args.vocab_size, args.out)
    tokenizer = load_tokenizer(path)
    print(f"wrote {path}: vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, eos {tokenizer.eos_id}",
          file=sys.stderr)


def console() -> None:
    sys.exit(run_cli(main))
