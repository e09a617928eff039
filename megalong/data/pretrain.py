"""Pretraining samples from IndexedDatasets through megatron-core's GPTDataset.

Documents (each ending in EOS, as preprocess wrote them) are concatenated in a seeded shuffled
order and cut into samples of seq_length + 1 tokens; a sample gives tokens = run[:-1],
labels = run[1:], loss_mask 1 everywhere and position_ids 0..N-1 (no resets at EOS, as
LongLoRA's pretraining-style fine-tuning). BlendedMegatronDatasetBuilder does the blending
("w1 p1 w2 p2") and the train/valid split by documents; its index caches (.npy) are built by
global rank 0 while the other ranks wait at a barrier, then read by everyone — so with several
nodes the cache directory must be on a shared file system. Outside torch.distributed it builds
locally. megatron's parallel_state is not needed.

`check_pretrain_data` is the torch-free half: it reads the .idx headers and refuses missing or
empty data, and splits too small to give a sample, naming the prefix.
"""

import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from megalong import runtime
from megalong.config.data import parse_data_prefix
from megalong.data.files import check_writable_dir
from megalong.data.preprocess import IndexSummary, read_index_summary
from megalong.data.tokenizer import Tokenizer, load_tokenizer
from megalong.errors import MegalongError


SPLIT_NAMES = ("train", "valid", "test")


def split_bounds(split: str) -> list[tuple[float, float] | None]:
    """"98,2,0" -> [(0, .98), (.98, 1.0), None], as megatron's split matrix."""
    values = [float(v) for v in re.findall(r"[.0-9]+", split)]
    if not values or len(values) > 3 or sum(values) <= 0:
        raise MegalongError(f"--split {split!r} must be up to three non-negative weights, e.g. 98,2,0")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    bounds, start = [], 0.0
    for value in values:
        end = start + value / total
        bounds.append(None if value == 0 else (start, end))
        start = end
    return bounds


def _split_tokens(summary: IndexSummary, bound: tuple[float, float]) -> int:
    documents = summary.num_documents
    begin, end = int(round(bound[0] * documents)), int(round(bound[1] * documents))
    # Documents are single sequences here (preprocess writes one per document).
    first, last = summary.document_indices[begin], summary.document_indices[end]
    return int(summary.sequence_lengths[first:last].sum(dtype=np.int64))


def check_pretrain_data(data_prefix: Sequence[str] | str, seq_length: int, split: str = "98,2,0",
                        num_samples: Sequence[int | None] = (None, None)) -> list[IndexSummary]:
    """Torch-free checks of --data-path before any heavy work: both files of every prefix exist,
    hold tokens, and every split that will be sampled gets at least one document."""
    prefixes, _ = parse_data_prefix(data_prefix)
    bounds = split_bounds(split)
    summaries = []
    for prefix in prefixes:
        summary = read_index_summary(prefix)
        if summary.num_documents == 0 or summary.num_tokens == 0:
            raise MegalongError(f"data prefix {prefix} holds no tokens; re-run tools/preprocess_data.py "
                                "on non-empty input")
        for name, bound, wanted in zip(SPLIT_NAMES, bounds, list(num_samples) + [None] * 3):
            if bound is None or name == "test" or wanted == 0:
                continue
            tokens = _split_tokens(summary, bound)
            if tokens == 0:
                raise MegalongError(
                    f"data prefix {prefix}: the {name} split ({split}) of its {summary.num_documents} "
                    "documents gets none; add documents or change --split")
            if wanted is None and tokens < seq_length + 1:
                raise MegalongError(
                    f"data prefix {prefix}: the {name} split holds {tokens} tokens, fewer than one "
                    f"sample of seq-length {seq_length} + 1")
        summaries.append(summary)
    return summaries


class _MegatronTokenizerView:
    """What GPTDataset asks of a tokenizer: vocab size, the EOD id, a pad id, and identifiers for
    its cache hash. pad is -1 (never a real id): GPTDataset masks labels equal to pad, and
    pretraining samples are never padded (partial samples are dropped)."""

    def __init__(self, tokenizer: Tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.eos = tokenizer.eod
        self.pad = -1
        self.unique_identifiers = {"class": "megalong", **tokenizer.describe()}


def default_cache_dir(prefixes: Sequence[str]) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")


def build_pretrain_datasets(
    data_prefix: Sequence[str] | str,
    seq_length: int,
    *,
    seed: int,
    split: str = "98,2,0",
    num_samples: Sequence[int | None] = (None, None),
    tokenizer: Tokenizer | str,
    cache_dir: str | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
):
    """(train_ds, valid_ds) of megatron-core GPTDatasets (or BlendedDatasets for several
    prefixes); valid_ds is None when the split gives validation nothing. num_samples = (train,
    valid) samples to provide (None: one epoch). Items are dicts of tokens [N] int64, labels [N]
    int64 (tokens shifted by one), loss_mask [N] float32, position_ids [N] int64.

    Call on every rank (it synchronises with barriers when torch.distributed is initialised).
    is_built_on_rank: ranks that return False get None datasets (default: every rank builds)."""
    runtime.apply_patches("import")  # megatron-core's import warns that apex/TE are absent
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if seq_length < 1:
        raise MegalongError(f"seq-length {seq_length} must be positive")
    num_samples = list(num_samples) + [None] * (2 - len(num_samples))
    check_pretrain_data(data_prefix, seq_length, split, num_samples)
    prefixes, weights = parse_data_prefix(data_prefix)
    if weights is not None and any(n is None for n, b in zip(num_samples, split_bounds(split)[:2]) if b):
        raise MegalongError("a weighted blend needs sample counts for train and valid "
                            "(megatron builds each dataset in proportion to its weight)")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    cache_dir = cache_dir or default_cache_dir(prefixes)
    check_writable_dir(cache_dir, "dataset index cache directory (--data-cache-path)")

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=_MegatronTokenizerView(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [num_samples[0], num_samples[1], 0 if weights is not None else None]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    train_ds, valid_ds, _test_ds = builder.build()
    return train_ds, valid_ds


__all__ = ["split_bounds", "check_pretrain_data", "build_pretrain_datasets",
           "default_cache_dir"]
