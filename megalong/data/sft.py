"""Supervised fine-tuning on LongAlpaca-format json: Llama-2 chat prompt, loss on the answer only.

A record {"instruction", "input", "output"} becomes, as in LongLoRA's supervised-fine-tune.py,
    prompt = "[INST] <<SYS>>\\n{system}\\n<</SYS>> \\n\\n {instruction} \\n{input} [/INST]"  (input given)
    prompt = "[INST]{instruction}[/INST]"                                               (no input)
and the sequence   BOS + encode(prompt) + encode(output) + EOS,
truncated to seq_length tokens (LongLoRA truncates the same way) and padded to a multiple of the
S²-Attn group size G (DESIGN.md §5). Prompt and answer are encoded separately, so a sentencepiece
tokenizer starts the answer with a word boundary: "[/INST] answer</s>", Llama-2 chat's spacing.

Items match the pretraining datasets: tokens [L], labels [L] with labels[i] = tokens[i+1] (the
last label is padding), loss_mask [L] = 1 exactly where the label is an answer token or the EOS,
position_ids 0..L-1; L is a multiple of G (or seq_length with pad_to_seq_length, which pipeline
parallel needs: its stages exchange tensors of a fixed length). A record whose answer is cut off
entirely by the truncation has an all-zero loss_mask.
"""

import functools
import os

import numpy as np

from megalong.config.model import check_group_size
from megalong.data.tokenizer import Tokenizer, load_tokenizer
from megalong.errors import MegalongError
from megalong.records import iter_records


# Llama-2 chat's default system prompt, as LongLoRA's SFT prompt embeds it (the double space
# after "safe." is in the original).
LLAMA2_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't "
    "share false information."
)


def llama2_chat_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - LongAlpaca's key
    """The prompt LongLoRA's supervised-fine-tune.py builds for a LongAlpaca record."""
    if input:
        return (f"[INST] <<SYS>>\n{LLAMA2_SYSTEM_PROMPT}\n<</SYS>> \n\n {instruction} \n{input} [/INST]")
    return f"[INST]{instruction}[/INST]"


def load_sft_records(path: str) -> list[dict]:
    """LongAlpaca json (a list of records) or jsonl, checked: every record has string
    `instruction` and `output`; `input` is optional."""
    if not os.path.isfile(path):
        raise MegalongError(f"SFT data {path} does not exist")
    records = []
    for where, record in iter_records(path):
        if not isinstance(record, dict):
            raise MegalongError(f"SFT data {where} is {type(record).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise MegalongError(f"SFT data {where} lacks a string {key!r} "
                                    "(LongAlpaca records have instruction, input, output)")
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise MegalongError(f"SFT data {where}: 'input' is not a string")
        records.append(record)
    if not records:
        raise MegalongError(f"SFT data {path} holds no records")
    return records


def build_sft_sample(prompt_ids: list[int], answer_ids: list[int], *, bos_id: int | None,
                     eos_id: int, pad_id: int, seq_length: int, group_size: int,
                     pad_to_seq_length: bool = False) -> dict[str, np.ndarray]:
    """The arrays of one sample (pure; see the module docstring for the layout)."""
    check_group_size(seq_length, group_size)
    head = ([bos_id] if bos_id is not None else []) + list(prompt_ids)
    sequence = (head + list(answer_ids) + [eos_id])[:seq_length]
    answer_start, used = len(head), len(sequence)
    length = seq_length if pad_to_seq_length else -(-used // group_size) * group_size
    tokens = np.full(length, pad_id, dtype=np.int64)
    tokens[:used] = sequence
    labels = np.full(length, pad_id, dtype=np.int64)
    labels[:-1] = tokens[1:]
    target_position = np.arange(1, length + 1)  # the index in `tokens` that each label holds
    loss_mask = ((target_position >= answer_start) & (target_position < used)).astype(np.float32)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": np.arange(length, dtype=np.int64)}


def collate_sft(samples: list[dict], pad_id: int) -> dict:
    """Stack samples into [B, L] tensors, padding each to the longest (a multiple of G when
    every sample is): padded tokens and labels are pad_id, their loss_mask is 0."""
    import torch

    length = max(int(sample["tokens"].shape[0]) for sample in samples)
    batch = {}
    for key, fill in (("tokens", pad_id), ("labels", pad_id), ("loss_mask", 0.0)):
        rows = []
        for sample in samples:
            row = torch.as_tensor(sample[key])
            pad = length - row.shape[0]
            rows.append(torch.cat([row, row.new_full((pad,), fill)]) if pad else row)
        batch[key] = torch.stack(rows)
    batch["position_ids"] = torch.arange(length, dtype=torch.int64).expand(len(samples), length).clone()
    return batch


class SftDataset:
    """A map-style dataset (torch DataLoader compatible) over LongAlpaca records; tokenizes on
    access, so start-up is instant and DataLoader workers share the work. Use `collate` as the
    DataLoader's collate_fn."""

    def __init__(self, records_or_path, tokenizer: Tokenizer | str, *, seq_length: int,
                 group_size: int, pad_to_seq_length: bool = False):
        check_group_size(seq_length, group_size)
        self.records = (load_sft_records(records_or_path) if isinstance(records_or_path, str)
                        else list(records_or_path))
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.seq_length = seq_length
        self.group_size = group_size
        self.pad_to_seq_length = pad_to_seq_length
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        self.collate = functools.partial(collate_sft, pad_id=self.pad_id)

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, index: int) -> dict[str, np.ndarray]:
        record = self.records[index]
        prompt = llama2_chat_prompt(record["instruction"], record.get("input") or "")
        return build_sft_sample(
            self.tokenizer.encode(prompt), self.tokenizer.encode(record["output"]),
            bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id, pad_id=self.pad_id,
            seq_length=self.seq_length, group_size=self.group_size,
            pad_to_seq_length=self.pad_to_seq_length,
        )

    def __getitem__(self, index: int) -> dict:
        import torch

        return {key: torch.from_numpy(value) for key, value in self.encode(index).items()}


__all__ = ["LLAMA2_SYSTEM_PROMPT", "llama2_chat_prompt", "load_sft_records", "check_group_size",
           "build_sft_sample", "collate_sft", "SftDataset"]
