"""LoRA options and names, torch-free (CLIs validate and read checkpoint metadata before torch)."""

from dataclasses import dataclass

from megalong.errors import MegalongError

from megalong.model.weight_map import (  # noqa: F401  (PART_TO_HF, PART_TO_LINEAR: re-exported)
    LINEARS, LORA_PARTS, PART_TO_HF, PART_TO_LINEAR)

# --lora-targets names -> the HF linears (LoRA parts) they adapt: attention's one by one, each
# MLP linear whole (the weight map says which HF linears each megatron linear holds).
TARGET_PARTS = {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",),
                "fc1": LINEARS["linear_fc1"].parts, "fc2": LINEARS["linear_fc2"].parts}
PART_ORDER = LORA_PARTS
TRAINABLE_EXTRAS = ("embed", "norm")


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # HF linears adapted: any of q, k, v, o, gate, up, down (parts_for_targets maps flag names).
    parts: tuple = ("q", "k", "v", "o")
    init_seed: int = 1234

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_metadata(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "parts": list(self.parts)}

    @classmethod
    def from_metadata(cls, meta: dict) -> "LoraOptions":
        return cls(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                   dropout=float(meta.get("dropout", 0.0)), parts=tuple(meta["parts"]))


def parts_for_targets(targets) -> tuple:
    """--lora-targets names (q,k,v,o,fc1,fc2) -> HF parts in a fixed order."""
    unknown = [t for t in targets if t not in TARGET_PARTS]
    if unknown:
        raise MegalongError(f"unknown LoRA target(s) {', '.join(unknown)}; valid targets: "
                            f"{', '.join(TARGET_PARTS)}")
    chosen = {part for target in targets for part in TARGET_PARTS[target]}
    return tuple(part for part in PART_ORDER if part in chosen)


def validate_trainable(extras) -> tuple:
    extras = tuple(e for e in extras if e != "none")
    unknown = [e for e in extras if e not in TRAINABLE_EXTRAS]
    if unknown:
        raise MegalongError(f"unknown trainable parameter group(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(TRAINABLE_EXTRAS)} or none")
    return extras


def lora_metadata(options: LoraOptions, extras) -> dict:
    """What a checkpoint records (megalong.json "lora") to rebuild its adapters."""
    return {**options.to_metadata(), "trainable_params": list(validate_trainable(extras))}
