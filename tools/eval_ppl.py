#!/usr/bin/env python3
"""Long-context perplexity with dense attention, as LongLoRA's eval defines it: windows of (megalong/cli/eval_ppl.py; installed as `megalong-eval-ppl`)."""

from megalong.cli.eval_ppl import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
