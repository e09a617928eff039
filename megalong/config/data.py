"""Training data: pretraining IndexedDatasets (Megatron-LM's --data-path) or SFT records."""

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from megalong.config._fields import as_tuple, from_namespace
from megalong.errors import MegalongError
from megalong.records import check_records_head


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    data_path: Optional[tuple] = None  # 'W1 P1 W2 P2' or 'P1 P2'
    sft_data: Optional[str] = None
    split: str = "98,2,0"
    tokenizer: Optional[str] = None

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("data")
        group.add_argument("--data-path", nargs="+", default=None,
                           help="IndexedDataset prefix(es) from tools/preprocess_data.py, "
                                "optionally weighted as Megatron-LM does: 'W1 PREFIX1 W2 PREFIX2'")
        group.add_argument("--sft-data", default=None,
                           help="LongAlpaca-style json (instruction/input/output): supervised "
                                "fine-tuning with loss on the answers only")
        group.add_argument("--split", default="98,2,0", help="train,valid,test split of --data-path")
        group.add_argument("--tokenizer", default=None,
                           help="sentencepiece tokenizer.model or an HF tokenizer directory")

    @classmethod
    def from_args(cls, namespace) -> "DataConfig":
        return from_namespace(cls, namespace, data_path=as_tuple(namespace.data_path))

    def validate(self) -> None:
        if (self.data_path is None) == (self.sft_data is None):
            raise MegalongError("give exactly one of --data-path (pretraining) or --sft-data (SFT)")
        if self.data_path:
            for prefix in parse_data_prefix(self.data_path)[0]:
                for suffix in (".bin", ".idx"):
                    if not os.path.isfile(prefix + suffix):
                        raise MegalongError(f"--data-path {prefix}: {prefix + suffix} does not "
                                            "exist (make it with tools/preprocess_data.py)")
        if self.sft_data and not os.path.isfile(self.sft_data):
            raise MegalongError(f"--sft-data {self.sft_data} does not exist")
        if self.sft_data:
            _check_sft_head(self.sft_data)
        if self.sft_data and not self.tokenizer:
            raise MegalongError("--sft-data needs --tokenizer")
        if self.tokenizer and not os.path.exists(self.tokenizer):
            raise MegalongError(f"--tokenizer {self.tokenizer} does not exist")


def _check_sft_head(path: str) -> None:
    """Cheap and torch-free: an empty file or list, or text that is neither json nor jsonl.
    (Every record is checked when the dataset is built.)"""
    check_records_head(path, "--sft-data",
                       " (LongAlpaca: a list of {instruction, input, output} records)")


def strip_data_suffix(prefix: str) -> str:
    """`corpus.bin` / `corpus.idx` -> `corpus` (users often pass a file name as the prefix)."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def parse_data_prefix(data_prefix) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's --data-path: "w1 p1 w2 p2 ..." (weighted blend) or "p1 p2 ..." (blend by
    size). Items may be separate list entries or one whitespace-separated string."""
    items = data_prefix.split() if isinstance(data_prefix, str) else [
        token for entry in data_prefix for token in str(entry).split()]
    if not items:
        raise MegalongError("no data prefix given; pass --data-path PREFIX (from "
                            "tools/preprocess_data.py)")

    def is_weight(text):
        try:
            float(text)
        except ValueError:
            return False
        return not os.path.exists(text + ".idx")  # a corpus may be named "2024"

    if is_weight(items[0]) and len(items) % 2:
        raise MegalongError(f"--data-path {' '.join(items)}: weights and prefixes must pair up")
    if len(items) % 2 == 0 and all(is_weight(w) for w in items[0::2]):
        weights = [float(w) for w in items[0::2]]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise MegalongError(f"blend weights {weights} must be non-negative with a positive sum")
        return [strip_data_suffix(p) for p in items[1::2]], weights
    if any(is_weight(item) for item in items):
        raise MegalongError(f"--data-path {' '.join(items)}: give either prefixes only or "
                            "weight/prefix pairs (\"0.7 corpusA 0.3 corpusB\")")
    return [strip_data_suffix(p) for p in items], None
