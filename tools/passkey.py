#!/usr/bin/env python3
"""Passkey retrieval (LongLoRA-style): a random 5-digit key hidden at a chosen depth in repeated (megalong/cli/passkey.py; installed as `megalong-passkey`)."""

from megalong.cli.passkey import build_parser, console, main  # noqa: F401  (build_parser: the flags doc)

if __name__ == "__main__":
    console()
