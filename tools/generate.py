#!/usr/bin/env python3
"""Generate text with the megatron model: greedy (--temperature 0, the default) or top-p (megalong/cli/generate.py; installed as `megalong-generate`)."""

from megalong.cli.generate import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
