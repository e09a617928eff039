"""The training tokenizer, checked against the model before torch is imported (torch-free)."""

from megalong.data.tokenizer import load_tokenizer
from megalong.errors import MegalongError
from megalong.source import find_tokenizer


def load_checked_tokenizer(tokenizer, load, arch):
    """--tokenizer, else the tokenizer that came with --load; its ids must fit the model."""
    path = tokenizer or find_tokenizer(load)
    if path is None:
        raise MegalongError("no tokenizer: pass --tokenizer (the checkpoint carries none)")
    loaded = load_tokenizer(path)
    if loaded.vocab_size > arch.vocab_size:
        raise MegalongError(
            f"tokenizer {path} has {loaded.vocab_size} tokens but the model's vocabulary is "
            f"{arch.vocab_size}: they do not belong together")
    return loaded
