#!/usr/bin/env python3
"""LongLoRA training on megatron-core, one process or one torchrun rank (megalong/cli/train.py;
installed as `megalong-train`). examples/pretrain_longlora.sh is the launcher."""

from megalong.cli.train import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
