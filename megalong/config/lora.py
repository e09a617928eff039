"""LoRA+ (DESIGN.md §7): the flags (LoraConfig) and the adapters they describe (LoraOptions, what
a checkpoint records), with the names of what can be adapted and trained."""

import argparse
from dataclasses import dataclass
from typing import Optional

from megalong.config._fields import from_namespace
from megalong.config.weight_map import LINEARS, LORA_PARTS
from megalong.errors import MegalongError


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


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("q", "k", "v", "o")  # --lora-targets names
    trainable_params: tuple = ("embed", "norm")  # () for plain LoRA
    full_finetune: bool = False
    lora_b_lr_ratio: Optional[float] = None

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("LoRA+")
        group.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (default 8)")
        group.add_argument("--lora-alpha", type=float, default=16.0,
                           help="LoRA alpha; the update is scaled by alpha / rank (default 16)")
        group.add_argument("--lora-dropout", type=float, default=0.0,
                           help="dropout on the adapters' input (default 0)")
        group.add_argument("--lora-targets", default="q,k,v,o",
                           help="comma-separated linears to adapt: q,k,v,o (attention), fc1 "
                                "(gate+up), fc2 (down) (default q,k,v,o)")
        group.add_argument("--trainable-params", default="embed,norm",
                           help="trained besides the adapters: embed (input embedding), norm (all "
                                "RMSNorms), comma-separated, or none for plain LoRA; lm_head stays "
                                "frozen (default embed,norm: LongLoRA's LoRA+)")
        group.add_argument("--full-finetune", action="store_true",
                           help="train every parameter, no adapters")
        group.add_argument("--lora-b-lr-ratio", type=float, default=None,
                           help="learning rate of the B factors relative to --lr (LoRA+ optimiser "
                                "paper; default 1)")

    @classmethod
    def from_args(cls, namespace) -> "LoraConfig":
        """The comma lists are checked here: an unknown name is a flag error."""
        targets = _comma_list(namespace.lora_targets)
        unknown = [t for t in targets if t not in TARGET_PARTS]
        if unknown or not targets:
            raise MegalongError(f"--lora-targets {namespace.lora_targets!r}: unknown target(s) "
                                f"{', '.join(unknown) or '(none given)'}; valid: "
                                f"{','.join(TARGET_PARTS)}")
        groups = _comma_list(namespace.trainable_params)
        unknown = [g for g in groups if g not in TRAINABLE_EXTRAS and groups != ["none"]]
        if unknown or not groups:
            raise MegalongError(f"--trainable-params {namespace.trainable_params!r}: unknown "
                                f"group(s) {', '.join(unknown) or '(none given)'}; valid: "
                                f"{','.join(TRAINABLE_EXTRAS)} or none")
        return from_namespace(cls, namespace, lora_targets=tuple(targets),
                              trainable_params=() if groups == ["none"] else tuple(groups))

    def validate(self) -> None:
        if self.full_finetune:
            return
        if self.lora_rank < 1:
            raise MegalongError(f"--lora-rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise MegalongError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MegalongError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_b_lr_ratio is not None and self.lora_b_lr_ratio <= 0:
            raise MegalongError(f"--lora-b-lr-ratio must be > 0, got {self.lora_b_lr_ratio}")
        parts_for_targets(self.lora_targets)

    @property
    def trainable_extras(self) -> tuple:
        return () if self.full_finetune else self.trainable_params

    def options(self, seed: int = 1234) -> LoraOptions:
        return LoraOptions(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                           parts=parts_for_targets(self.lora_targets), init_seed=seed)

    def check_fits_checkpoint(self, saved: Optional[dict], load: str) -> None:
        """A checkpoint that carries LoRA adapters continues only with adapters of the same shape
        (rank and adapted linears); torch-free, so the mismatch is named before start-up."""
        if not saved:
            return
        described = f"LoRA rank {saved['rank']} on {','.join(saved['parts'])}"
        if self.full_finetune:
            raise MegalongError(f"checkpoint {load} holds {described}; --full-finetune would drop "
                                "the adapters: export it with --merge-lora and convert it back, or "
                                "drop --full-finetune")
        parts = list(parts_for_targets(self.lora_targets))
        if int(saved["rank"]) != self.lora_rank or list(saved["parts"]) != parts:
            raise MegalongError(
                f"checkpoint {load} holds {described} but the flags ask for rank {self.lora_rank} "
                f"on {','.join(parts)}: the adapters would not fit; pass --lora-rank "
                f"{saved['rank']} and matching --lora-targets to continue it")


def _comma_list(value: str) -> list:
    return [item.strip() for item in value.split(",") if item.strip()]
