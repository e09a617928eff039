#!/usr/bin/env python3
"""Convert Llama checkpoints between Hugging Face and megatron-core distributed format. (megalong/cli/convert.py; installed as `megalong-convert`)."""

from megalong.cli.convert import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
