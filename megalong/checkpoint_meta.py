"""Checkpoint directory layout and metadata (torch-free, so CLIs can check --load early).

    ROOT/latest_checkpointed_iteration.txt   the iteration to resume from (Megatron-LM's name)
    ROOT/iter_0000100/                       a megatron-core distributed checkpoint
    ROOT/iter_0000100/megalong.json          what is needed to rebuild the model for it
    ROOT/tokenizer/                          tokenizer files, when the source model had them
"""

import json
import os

from megalong.errors import MegalongError

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "megalong.json"
TOKENIZER_SUBDIR = "tokenizer"  # ROOT/tokenizer/: the tokenizer files travel with checkpoints


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int:
    tracker = os.path.join(root, TRACKER)
    if not os.path.isdir(root):
        raise MegalongError(f"checkpoint directory {root} does not exist")
    if not os.path.isfile(tracker):
        raise MegalongError(f"{root} is not a megalong checkpoint: {TRACKER} is missing")
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise MegalongError(f"{tracker} holds {text!r}, not an iteration number")
    return int(text)


def read_metadata(root: str, iteration: int | None = None) -> dict:
    if iteration is None:
        iteration = latest_iteration(root)
    path = os.path.join(iteration_dir(root, iteration), METADATA)
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise MegalongError(f"{path} is missing: the checkpoint is incomplete") from None
    except (OSError, json.JSONDecodeError) as err:
        raise MegalongError(f"{path} is unreadable: {err}") from None
