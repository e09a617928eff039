"""Token streams to evaluate on (torch-free): a megatron IndexedDataset prefix, whose documents
are read concatenated in order (with the EOS preprocessing put after each), or a flat token file
(LongLoRA's PG19 / proof-pile eval format: raw uint16 ids, uint32 above 65536 ids)."""

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megalong.config.data import strip_data_suffix
from megalong.data.preprocess import load_token_file, read_index_summary, token_file_dtype
from megalong.errors import MegalongError


@dataclass(frozen=True)
class EvalTokens:
    path: str
    kind: str  # "indexed" or "flat"
    tokens: np.ndarray  # read-only memmap, 1-D

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def describe(self) -> dict:
        return {"path": os.path.abspath(self.path), "format": self.kind, "tokens": len(self),
                "dtype": self.tokens.dtype.name}


def is_indexed_prefix(path: str) -> bool:
    return os.path.isfile(strip_data_suffix(path) + ".idx")


def open_eval_tokens(path: str, *, vocab_size: int, dtype: Optional[str] = None) -> EvalTokens:
    """`path`: an IndexedDataset prefix (or its .bin/.idx), else a flat token file read as `dtype`
    (default uint16, uint32 for vocabularies over 65536). Every id must lie below vocab_size."""
    if is_indexed_prefix(path):
        if dtype is not None:
            raise MegalongError(f"--data {path} is an IndexedDataset (its .idx records the dtype); "
                                "--data-dtype is for flat token files only")
        prefix = strip_data_suffix(path)
        summary = read_index_summary(prefix)
        tokens = np.memmap(prefix + ".bin", dtype=summary.dtype, mode="r")
        kind = "indexed"
    else:
        if not os.path.exists(path) and not os.path.exists(path + ".bin"):
            raise MegalongError(f"--data {path}: no such token file, and no IndexedDataset "
                                f"{strip_data_suffix(path)}.bin/.idx")
        tokens = load_token_file(path, dtype or token_file_dtype(vocab_size))
        kind = "flat"
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise MegalongError(f"--data {path} holds token id {int(tokens.max())}, outside the model's "
                            f"vocabulary of {vocab_size}: it was tokenized for another model"
                            + ("" if kind == "indexed" else " (or pass its --data-dtype)"))
    return EvalTokens(path, kind, tokens)


# ---------------------------------------------------------------- windows (DESIGN.md §9)


def window_starts(num_tokens: int, seq_length: int, stride: int,
                  max_windows: Optional[int] = None) -> list[int]:
    """LongLoRA's window starts; with max_windows, that many spread evenly over them."""
    if seq_length < 2 or stride < 1:
        raise MegalongError(f"seq-length must be >= 2 and stride >= 1, got {seq_length} and {stride}")
    starts = list(range(0, num_tokens - seq_length, stride))[:-1]
    if not starts:
        raise MegalongError(f"the data holds {num_tokens} tokens; seq-length {seq_length} with stride "
                            f"{stride} needs more than {seq_length + stride} for one window")
    if max_windows is not None and max_windows < len(starts):
        picks = np.unique(np.linspace(0, len(starts) - 1, max_windows).round().astype(int))
        starts = [starts[i] for i in picks]
    return starts


def repeated_windows(tokens: np.ndarray, seq_length: int, stride: int,
                     max_windows: Optional[int] = None) -> tuple[np.ndarray, list[int]]:
    """The repeat probe's windows, laid end to end, and their starts: the first seq_length/2
    tokens of each ordinary window (window_starts), then the same tokens again. Predicting the
    second copy well takes attention seq_length/2 tokens back."""
    if seq_length % 2:
        raise MegalongError(f"the repeat probe needs even lengths, got {seq_length}")
    half = seq_length // 2
    starts = window_starts(len(tokens), seq_length, stride, max_windows)
    stream = np.concatenate([np.tile(tokens[s:s + half], 2) for s in starts])
    return stream, [i * seq_length for i in range(len(starts))]


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")


def check_windows_fit(num_tokens: int, seq_lengths, stride: int) -> None:
    """Torch-free: every requested length has at least one window."""
    for seq_length in seq_lengths:
        window_starts(num_tokens, seq_length, stride, max_windows=1)
