"""The training tokenizer, checked against the model before torch is imported (torch-free)."""

import os

from megalong.checkpoint_meta import TOKENIZER_SUBDIR
from megalong.errors import MegalongError


def load_checked_tokenizer(args, arch):
    """--tokenizer, else the tokenizer that came with --load; its ids must fit the model."""
    from megalong.data.tokenizer import load_tokenizer

    path = args.tokenizer
    if path is None and args.load and os.path.isdir(os.path.join(args.load, TOKENIZER_SUBDIR)):
        candidate = os.path.join(args.load, TOKENIZER_SUBDIR)
        if any(name.startswith("tokenizer") for name in os.listdir(candidate)):
            path = candidate
    if path is None:
        raise MegalongError("no tokenizer: pass --tokenizer (the checkpoint carries none)")
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > arch.vocab_size:
        raise MegalongError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{arch.vocab_size}: they do not belong together")
    return tokenizer
