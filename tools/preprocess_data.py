#!/usr/bin/env python3
"""Tokenize text into a megatron-core IndexedDataset (.bin/.idx, readable by Megatron-LM too). (megalong/cli/preprocess.py; installed as `megalong-preprocess`)."""

from megalong.cli.preprocess import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
