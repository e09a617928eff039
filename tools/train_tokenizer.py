#!/usr/bin/env python3
"""Train a Llama-style sentencepiece tokenizer (BPE, byte fallback, unk=0, bos=1, eos=2). (megalong/cli/tokenizer.py; installed as `megalong-tokenizer`)."""

from megalong.cli.tokenizer import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
