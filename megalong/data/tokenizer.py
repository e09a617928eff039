"""Tokenizers behind one small interface, and sentencepiece training for the CPU demo (torch-free).

`load_tokenizer(path)` accepts
- a sentencepiece model file (Llama-2's `tokenizer.model`);
- a directory holding `tokenizer.json` (the HF `tokenizers` library; preferred, since it carries
  added tokens such as LongLoRA's `[PAD]`) or `tokenizer.model`;
- any other directory transformers' AutoTokenizer can read offline, when transformers is installed.
Every tokenizer encodes without BOS/EOS; callers add them where the format wants them.
"""

import io
import os
from collections.abc import Iterable, Iterator

from megalong.atomic import atomic_file
from megalong.data.files import check_writable_dir, make_dirs
from megalong.errors import MegalongError
from megalong.records import read_json


# Names tried when a HF tokenizer directory does not say which token ends a document.
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


class Tokenizer:
    """encode/decode plus the special ids the data pipeline needs. `eod` (end of document) is the
    EOS id, appended after every pretraining document and every SFT answer."""

    kind = "base"

    def __init__(self, path: str, vocab_size: int, bos_id, eos_id: int, pad_id):
        self.path = path
        self.vocab_size = int(vocab_size)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id

    @property
    def eod(self) -> int:
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies this tokenizer (recorded in dataset caches and checkpoints)."""
        return {"kind": self.kind, "path": os.path.abspath(self.path), "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as err:
            raise MegalongError(f"{model_file} is not a readable sentencepiece model ({err})") from None

        def optional(token_id):
            return None if token_id < 0 else token_id

        if self._sp.eos_id() < 0:
            raise MegalongError(f"sentencepiece model {model_file} defines no EOS token; "
                                "train it with eos_id set (train_tokenizer.py does)")
        super().__init__(model_file, self._sp.get_piece_size(), optional(self._sp.bos_id()),
                         self._sp.eos_id(), optional(self._sp.pad_id()))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def _special_token_names(directory: str) -> dict:
    """bos/eos/pad token strings from tokenizer_config.json or special_tokens_map.json; None for
    a role set to null there (Qwen's `"bos_token": null`: the tokenizer has no BOS)."""
    names = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            continue
        config = read_json(path)
        for role in ("bos", "eos", "pad"):
            value = config.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) or (value is None and f"{role}_token" in config):
                names[role] = value
    return names


class HFTokenizersTokenizer(Tokenizer):
    """A `tokenizer.json` read by the HF `tokenizers` library (no transformers needed)."""

    kind = "hf-tokenizers"

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as RustTokenizer

        json_path = os.path.join(directory, "tokenizer.json")
        try:
            self._tok = RustTokenizer.from_file(json_path)
        except Exception as err:  # noqa: BLE001 - the library raises bare Exceptions
            raise MegalongError(f"{json_path} is not a readable HF tokenizer ({err})") from None
        names = _special_token_names(directory)

        def token_id(role, candidates):
            if role in names and names[role] is None:
                # Declared absent: no guessing from the vocabulary, which may still hold a
                # "<s>" that the model never saw as a document start.
                return None
            for name in ([names[role]] if role in names else []) + list(candidates):
                found = self._tok.token_to_id(name)
                if found is not None:
                    return found
            return None

        eos_id = token_id("eos", _EOS_CANDIDATES)
        if eos_id is None:
            raise MegalongError(f"HF tokenizer in {directory} has no end-of-text token; set "
                                "eos_token in its tokenizer_config.json")
        super().__init__(directory, self._tok.get_vocab_size(with_added_tokens=True),
                         token_id("bos", _BOS_CANDIDATES), eos_id, token_id("pad", ()))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class TransformersTokenizer(Tokenizer):
    """Fallback for directories only transformers understands (e.g. vocab.json + merges.txt)."""

    kind = "transformers"

    def __init__(self, directory: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise MegalongError(f"{directory} has neither tokenizer.json nor tokenizer.model, and "
                                "transformers (needed for other tokenizer formats) is not installed") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - transformers raises many types
            raise MegalongError(f"cannot load a tokenizer from {directory}: {err}") from None
        if self._tok.eos_token_id is None:
            raise MegalongError(f"tokenizer in {directory} has no end-of-text token")
        super().__init__(directory, len(self._tok), self._tok.bos_token_id, self._tok.eos_token_id,
                         self._tok.pad_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
    """A sentencepiece model file, or a directory with tokenizer.json / tokenizer.model."""
    if not path or not os.path.exists(path):
        raise MegalongError(f"tokenizer {path!r} does not exist; pass a sentencepiece tokenizer.model "
                            "or a HF tokenizer directory")
    if os.path.isfile(path):
        if path.endswith(".json"):
            return HFTokenizersTokenizer(os.path.dirname(path) or ".")
        return SentencePieceTokenizer(path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return HFTokenizersTokenizer(path)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
    return TransformersTokenizer(path)


def check_tokenizer_path(path: str) -> None:
    """The cheap part of load_tokenizer's checks, for CLIs validating flags."""
    if not path or not os.path.exists(path):
        raise MegalongError(f"tokenizer {path!r} does not exist; pass a sentencepiece tokenizer.model "
                            "or a HF tokenizer directory")
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        raise MegalongError(f"tokenizer {path} is not readable")


# ---------------------------------------------------------------- training (the CPU demo)


def _training_lines(texts_or_files: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of each text; an item naming an existing file is read as that file."""
    for item in texts_or_files:
        if len(item) < 4096 and "\n" not in item and os.path.isfile(item):
            with open(item, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        else:
            text = item
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(texts_or_files: Iterable[str], vocab_size: int, out_dir: str, *,
                        num_threads: int = 2, max_sentences: int = 2_000_000) -> str:
    """Train a Llama-style BPE sentencepiece model (byte fallback, unk=0, bos=1, eos=2, no pad,
    digits split, whitespace kept) and write out_dir/tokenizer.model atomically. Returns its path."""
    import sentencepiece as spm

    if vocab_size < 300:
        raise MegalongError(f"vocab size {vocab_size} is too small: byte fallback alone takes 259 ids; "
                            "use at least 300")
    check_writable_dir(out_dir, "tokenizer output directory")
    lines = _training_lines(texts_or_files)
    first = next(lines, None)
    if first is None:
        raise MegalongError("no text to train the tokenizer on (inputs are empty)")

    def sentences():
        yield first
        yield from lines

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", character_coverage=1.0,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=num_threads, minloglevel=2,
        )
    except RuntimeError as err:  # e.g. "Vocabulary size too high" on a small corpus
        raise MegalongError(f"sentencepiece training failed: {str(err).strip().splitlines()[-1]}") from None
    make_dirs(out_dir)
    path = os.path.join(out_dir, "tokenizer.model")
    with atomic_file(path) as staging, open(staging, "wb") as handle:
        handle.write(model.getvalue())
    return path


__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizersTokenizer", "TransformersTokenizer",
           "load_tokenizer", "check_tokenizer_path", "train_sentencepiece"]
