#!/usr/bin/env python3
"""Write a randomly initialised Llama as an HF checkpoint directory (for demos and benchmarks). (megalong/cli/random_model.py; installed as `megalong-random-model`)."""

from megalong.cli.random_model import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
