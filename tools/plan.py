#!/usr/bin/env python3
"""Per-GPU memory and step FLOPs of a megalong training configuration, before launching it. (megalong/cli/plan.py; installed as `megalong-plan`)."""

from megalong.cli.plan import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
