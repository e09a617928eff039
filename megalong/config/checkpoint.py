"""Checkpoint directory layout and metadata (torch-free, so CLIs can check --load early).

    ROOT/latest_checkpointed_iteration.txt   the iteration to resume from (Megatron-LM's name)
    ROOT/iter_0000100/                       a megatron-core distributed checkpoint
    ROOT/iter_0000100/megalong.json          what is needed to rebuild the model for it
    ROOT/tokenizer/                          tokenizer files, when the source model had them
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from megalong.config.arch import LlamaArch
from megalong.errors import MegalongError
from megalong.records import read_json


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


FORMAT = "megalong-1"


@dataclass(frozen=True, kw_only=True)
class CheckpointMetadata:
    """megalong.json: what is needed to rebuild the model a checkpoint holds."""

    arch: LlamaArch
    padded_vocab_size: int
    seq_length: int
    interpolation_factor: Optional[float] = None
    # The layout it was written at (a distributed checkpoint loads at any other).
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # LoRA adapters it carries: rank, alpha, dropout, parts, trainable_params (lora_metadata()).
    lora: Optional[dict] = None
    source: Optional[str] = None  # the HF directory it was converted from
    hf_config: Optional[dict] = None  # that directory's config.json, the base of an export
    # Written by save_checkpoint:
    iteration: Optional[int] = None
    world_size: Optional[int] = None
    has_training_state: bool = False
    format: str = FORMAT

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "arch": dataclasses.asdict(self.arch)}

    @classmethod
    def from_json(cls, data: dict, path: str = "megalong.json") -> "CheckpointMetadata":
        if data.get("format", FORMAT) != FORMAT:
            raise MegalongError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{**{k: v for k, v in data.items() if k in known},
                          "arch": LlamaArch(**data["arch"])})
        except (KeyError, TypeError) as err:
            raise MegalongError(f"{path} is not megalong checkpoint metadata: {err}") from None

    def replace(self, **changes) -> "CheckpointMetadata":
        return dataclasses.replace(self, **changes)

    def check_export(self, load: str, *, out, merge_lora: bool, peft_adapter) -> None:
        """megatron-to-hf's flags fit whether the checkpoint holds LoRA adapters."""
        if (merge_lora or peft_adapter) and not self.lora:
            raise MegalongError(f"checkpoint {load} holds no LoRA adapters; export it without "
                                "--merge-lora/--peft-adapter")
        if self.lora and out and not merge_lora:
            raise MegalongError(f"checkpoint {load} holds LoRA adapters: pass --merge-lora to fold "
                                "them into the exported HF weights (and/or --peft-adapter DIR for a "
                                "PEFT adapter)")
        if not out and not peft_adapter:
            raise MegalongError("megatron-to-hf needs --out (an HF model) or --peft-adapter DIR")


def read_metadata(root: str, iteration: int | None = None) -> CheckpointMetadata:
    if iteration is None:
        iteration = latest_iteration(root)
    path = os.path.join(iteration_dir(root, iteration), METADATA)
    data = read_json(path, missing=f"{path} is missing: the checkpoint is incomplete")
    return CheckpointMetadata.from_json(data, path)
