"""Raw text / jsonl / parquet -> megatron-core IndexedDataset (.bin/.idx), and the flat token files
LongLoRA's evaluation reads.

The .bin/.idx pair is written by megatron-core's IndexedDatasetBuilder, so it is the format
Megatron-LM's tools/preprocess_data.py writes and its GPTDataset reads: one document per jsonl
line, parquet row or text file (or per paragraph with split_paragraphs), the EOS id appended to
each document, token dtype uint16 for vocabularies under 65500 ids and int32 above.

Everything up to the writing is torch-free (validation runs before the slow imports); the outputs
appear only when complete (staging names renamed at the end), so a failed run leaves nothing.
"""

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from megalong import runtime
from megalong.atomic import atomic_file, remove_quietly, staging_path
from megalong.config.data import strip_data_suffix
from megalong.data.files import check_writable_dir, expand_inputs, make_dirs, remove_created_dirs
from megalong.data.tokenizer import Tokenizer, check_tokenizer_path, load_tokenizer
from megalong.errors import MegalongError
from megalong.log import ProgressPrinter
from megalong.records import iter_records


JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


# ---------------------------------------------------------------- reading documents


def _paragraphs(text: str) -> Iterator[str]:
    paragraph = []
    for line in text.split("\n"):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _json_texts(path: str, json_key: str) -> Iterator[str]:
    def text_of(record, where):
        if not isinstance(record, dict) or json_key not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise MegalongError(f"{where}: no key {json_key!r} (found: {keys}); pass --json-key")
        value = record[json_key]
        if not isinstance(value, str):
            raise MegalongError(f"{where}: {json_key!r} holds {type(value).__name__}, not text")
        return value

    for where, record in iter_records(path):
        yield text_of(record, where)


def _parquet_texts(path: str, json_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MegalongError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types
        raise MegalongError(f"{path} is not a readable parquet file ({err})") from None
    if json_key not in parquet.schema_arrow.names:
        raise MegalongError(f"{path}: no column {json_key!r} (found: "
                            f"{', '.join(parquet.schema_arrow.names)}); pass --json-key")
    for batch in parquet.iter_batches(columns=[json_key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def iter_documents(path: str, json_key: str = "text", split_paragraphs: bool = False) -> Iterator[str]:
    """The documents of one input file, by suffix: .jsonl/.json (one record per line, or a JSON
    array), .parquet (a column), anything else plain UTF-8 text (the whole file is one document).
    With split_paragraphs every blank-line-separated paragraph is its own document."""
    lower = path.lower()
    if lower.endswith(JSON_SUFFIXES):
        texts = _json_texts(path, json_key)
    elif lower.endswith(PARQUET_SUFFIXES):
        texts = _parquet_texts(path, json_key)
    else:
        with open(path, encoding="utf-8", errors="replace") as handle:
            texts = iter([handle.read()])
    for text in texts:
        if split_paragraphs:
            yield from _paragraphs(text)
        elif text.strip():
            yield text


# ---------------------------------------------------------------- validation (torch-free)


def validate_preprocess(inputs: list[str], output_prefix: str, tokenizer_path: str | None,
                        workers: int = 1) -> list[str]:
    """Every check that needs no tokenizing: returns the expanded input files."""
    files = expand_inputs(inputs)
    if all(os.path.getsize(path) == 0 for path in files):
        raise MegalongError(f"input is empty: {', '.join(files)} hold no bytes")
    if not output_prefix:
        raise MegalongError("--output-prefix is empty")
    if output_prefix.endswith(os.sep) or os.path.isdir(output_prefix):
        raise MegalongError(f"--output-prefix {output_prefix} is a directory; give a file prefix "
                            f"such as {os.path.join(output_prefix, 'corpus')}")
    check_writable_dir(os.path.dirname(os.path.abspath(output_prefix)))
    if tokenizer_path is not None:
        check_tokenizer_path(tokenizer_path)
    if workers < 1:
        raise MegalongError(f"--workers {workers} must be at least 1")
    return files


# ---------------------------------------------------------------- tokenizing and writing


@dataclass(frozen=True)
class PreprocessResult:
    output_prefix: str
    documents: int
    tokens: int
    seconds: float
    dtype: str


class _Progress:
    """Documents, tokens and tokens/s on stderr: one updating line on a terminal, a line every
    `interval_s` seconds otherwise, and always a final line."""

    def __init__(self, stream, interval_s: float | None = None):
        self.printer = ProgressPrinter(interval_s=interval_s, stream=stream,
                                       enabled=stream is not None)

    def line(self, documents: int, tokens: int) -> str:
        elapsed = self.printer.elapsed()
        return (f"[preprocess] {documents:,} documents, {tokens:,} tokens, "
                f"{tokens / elapsed:,.0f} tokens/s, {elapsed:.1f}s")

    def update(self, documents: int, tokens: int) -> None:
        self.printer.update(lambda: self.line(documents, tokens))

    def finish(self, documents: int, tokens: int) -> None:
        self.printer.update(lambda: self.line(documents, tokens), final=True)


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def _encode_in_worker(args):
    text, append_eod = args
    ids = _WORKER_TOKENIZER.encode(text)
    if append_eod:
        ids.append(_WORKER_TOKENIZER.eod)
    return np.asarray(ids, dtype=np.int64)


def _encoded_documents(documents: Iterator[str], tokenizer: Tokenizer, workers: int,
                       append_eod: bool) -> Iterator[np.ndarray]:
    if workers == 1:
        for text in documents:
            ids = tokenizer.encode(text)
            if append_eod:
                ids.append(tokenizer.eod)
            yield np.asarray(ids, dtype=np.int64)
        return
    import multiprocessing as mp

    # spawn: the parent may hold torch/megatron threads by now, which fork would copy mid-state.
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init,
                                      initargs=(tokenizer.path,)) as pool:
        yield from pool.imap(_encode_in_worker, ((text, append_eod) for text in documents),
                             chunksize=8)


def preprocess_to_indexed(inputs: list[str], output_prefix: str, tokenizer: Tokenizer | str, *,
                          json_key: str = "text", workers: int = 1, append_eod: bool = True,
                          split_paragraphs: bool = False, progress=sys.stderr) -> PreprocessResult:
    """Tokenize every document of `inputs` (paths or globs) into output_prefix.bin/.idx."""
    files = validate_preprocess(inputs, output_prefix,
                                tokenizer if isinstance(tokenizer, str) else None, workers)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)

    runtime.apply_patches("import")  # megatron-core's import warns that apex/TE are absent
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    bin_staging, idx_staging = staging_path(bin_path), staging_path(idx_path)
    created = make_dirs(os.path.dirname(os.path.abspath(output_prefix)))
    builder = None
    done = False
    meter = _Progress(progress)
    documents = tokens = 0
    texts = (text for path in files for text in iter_documents(path, json_key, split_paragraphs))
    encoded = _encoded_documents(texts, tokenizer, workers, append_eod)
    try:
        builder = IndexedDatasetBuilder(bin_staging, dtype=dtype)
        for ids in encoded:
            if ids.size == 0:
                continue
            builder.add_document(ids, [ids.size])
            documents += 1
            tokens += int(ids.size)
            meter.update(documents, tokens)
        if documents == 0:
            raise MegalongError(f"input is empty: no document with text in {', '.join(files)}"
                                + (f" under key {json_key!r}" if any(
                                    f.lower().endswith(JSON_SUFFIXES + PARQUET_SUFFIXES) for f in files)
                                   else ""))
        builder.finalize(idx_staging)
        os.replace(bin_staging, bin_path)
        os.replace(idx_staging, idx_path)
        done = True
    finally:
        encoded.close()  # stops the worker pool now, also on error
        if not done:
            if builder is not None and not builder.data_file.closed:
                builder.data_file.close()
            remove_quietly(bin_staging, idx_staging)
            remove_created_dirs(created)
    meter.finish(documents, tokens)
    return PreprocessResult(output_prefix, documents, tokens, time.monotonic() - meter.printer.start,
                            np.dtype(dtype).name)


# ---------------------------------------------------------------- reading an IndexedDataset index


@dataclass(frozen=True)
class IndexSummary:
    prefix: str
    dtype: str
    num_sequences: int
    num_documents: int
    sequence_lengths: np.ndarray
    document_indices: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64",
                7: "float32", 8: "uint16"}


def read_index_summary(prefix: str) -> IndexSummary:
    """Document and token counts of an IndexedDataset from its .idx, torch-free (for validating
    --data-path before any heavy work). Errors name the prefix."""
    prefix = strip_data_suffix(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        raise MegalongError(f"data prefix {prefix}: {' and '.join(missing)} not found; "
                            "write them with tools/preprocess_data.py")
    try:
        with open(idx_path, "rb") as handle:
            header = handle.read(34)
            if len(header) < 34 or header[:9] != _INDEX_HEADER:
                raise MegalongError(f"data prefix {prefix}: {idx_path} is not an IndexedDataset index")
            code = header[17]
            num_sequences = int(np.frombuffer(header[18:26], "<u8")[0])
            num_documents = int(np.frombuffer(header[26:34], "<u8")[0])
            lengths = np.fromfile(handle, dtype="<i4", count=num_sequences)
            handle.seek(34 + 4 * num_sequences + 8 * num_sequences)
            document_indices = np.fromfile(handle, dtype="<i8", count=num_documents)
    except OSError as err:
        raise MegalongError(f"data prefix {prefix}: cannot read {idx_path} ({err})") from None
    if code not in _DTYPE_CODES or lengths.size != num_sequences or document_indices.size != num_documents:
        raise MegalongError(f"data prefix {prefix}: {idx_path} is truncated or corrupt")
    expected_bytes = int(lengths.sum(dtype=np.int64)) * np.dtype(_DTYPE_CODES[code]).itemsize
    if os.path.getsize(bin_path) != expected_bytes:
        raise MegalongError(f"data prefix {prefix}: {bin_path} holds {os.path.getsize(bin_path)} bytes, "
                            f"its index describes {expected_bytes}; re-run preprocessing")
    return IndexSummary(prefix, _DTYPE_CODES[code], num_sequences, max(num_documents - 1, 0),
                        lengths, document_indices)


# ---------------------------------------------------------------- flat token files (LongLoRA eval)


def token_file_dtype(vocab_size: int | None = None) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32 (LongLoRA's eval format)."""
    if vocab_size is not None and vocab_size - 1 > np.iinfo(np.uint16).max:
        return np.dtype(np.uint32)
    return np.dtype(np.uint16)


def load_token_file(path: str, dtype=None, *, vocab_size: int | None = None) -> np.memmap:
    """A flat token file (LongLoRA's PG19/proof-pile eval data: raw ids, no header) as a read-only
    memmap. dtype defaults to uint16, or follows vocab_size (uint32 above 65536 ids)."""
    dtype = np.dtype(dtype) if dtype is not None else token_file_dtype(vocab_size)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32)):
        raise MegalongError(f"token file dtype {dtype} is not uint16, uint32 or int32")
    if not os.path.isfile(path):
        raise MegalongError(f"token file {path} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise MegalongError(f"token file {path} is empty")
    if size % dtype.itemsize:
        raise MegalongError(f"token file {path} has {size} bytes, not a whole number of {dtype} "
                            "tokens; pass the dtype it was written with")
    return np.memmap(path, dtype=dtype, mode="r")


def write_token_file(path: str, tokens, vocab_size: int) -> str:
    """Write token ids as a flat file in token_file_dtype(vocab_size), atomically."""
    dtype = token_file_dtype(vocab_size)
    array = np.asarray(tokens)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise MegalongError(f"token ids must lie in [0, {vocab_size}) to write {path}")
    check_writable_dir(os.path.dirname(os.path.abspath(path)))
    make_dirs(os.path.dirname(os.path.abspath(path)))
    with atomic_file(path) as staging:
        array.astype(dtype).tofile(staging)
    return path


__all__ = ["iter_documents", "validate_preprocess", "preprocess_to_indexed", "PreprocessResult",
           "read_index_summary", "IndexSummary", "load_token_file",
           "write_token_file", "token_file_dtype"]
