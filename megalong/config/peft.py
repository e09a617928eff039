"""A PEFT LoRA adapter's adapter_config.json: read and checked (an adapter megalong can represent
exactly), and written for an export. Torch-free, so the CLIs check adapters before start-up."""

import os

from megalong.config import weight_map
from megalong.config.weight_map import HF_MODULE_TO_PART, LORA_PARTS, PART_TO_HF_MODULE
from megalong.errors import MegalongError
from megalong.records import read_json


CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
LONGLORA_TRAINABLE_FILE = "trainable_params.bin"
# --trainable-params groups -> PEFT modules_to_save names (last component of the HF module path).
EXTRA_MODULES = weight_map.GROUP_MODULES


def read_peft_config(directory: str) -> dict:
    """adapter_config.json, checked: a plain LoRA adapter megalong can represent exactly.
    Returns {"rank", "alpha", "dropout", "parts", "modules_to_save", "weights", "trainable_file"}."""
    if not os.path.isdir(directory):
        raise MegalongError(f"PEFT adapter directory {directory} does not exist")
    path = os.path.join(directory, CONFIG_FILE)
    config = read_json(path, missing=f"{path} not found: --peft-adapter must be a PEFT adapter "
                                     "directory")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise MegalongError(f"{path}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}; "
                            "only LORA adapters are supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise MegalongError(f"{path}: r must be a positive integer and lora_alpha positive; got r={rank!r}, "
                            f"lora_alpha={alpha!r}")
    unsupported = [name for name, ok in [
        ("use_dora", not config.get("use_dora")), ("use_rslora", not config.get("use_rslora")),
        ("bias", config.get("bias", "none") == "none"), ("fan_in_fan_out", not config.get("fan_in_fan_out")),
        ("rank_pattern", not config.get("rank_pattern")), ("alpha_pattern", not config.get("alpha_pattern")),
        ("layers_to_transform", config.get("layers_to_transform") is None),
    ] if not ok]
    if unsupported:
        raise MegalongError(f"{path}: {', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} "
                            "not supported (plain LoRA on q/k/v/o/gate/up/down_proj only)")
    targets = config.get("target_modules")
    parts = None
    if isinstance(targets, list):
        names = [str(t).rsplit(".", 1)[-1] for t in targets]
        unknown = [n for n in names if n not in HF_MODULE_TO_PART]
        if unknown:
            raise MegalongError(f"{path}: target module(s) {', '.join(unknown)} cannot be adapted; valid: "
                                f"{', '.join(HF_MODULE_TO_PART)}")
        parts = ordered_parts(HF_MODULE_TO_PART[n] for n in names)
    weights = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(directory, name))]
    if not weights:
        raise MegalongError(f"no adapter weights in {directory}: expected {' or '.join(WEIGHT_FILES)}")
    trainable = os.path.join(directory, LONGLORA_TRAINABLE_FILE)
    return {
        "rank": rank, "alpha": float(alpha), "dropout": float(config.get("lora_dropout") or 0.0),
        "parts": parts,  # None: taken from the weight names (target_modules was a regex)
        "modules_to_save": list(config.get("modules_to_save") or []),
        "weights": os.path.join(directory, weights[0]),
        "trainable_file": trainable if os.path.isfile(trainable) else None,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }


def ordered_parts(parts) -> tuple:
    chosen = set(parts)
    return tuple(p for p in LORA_PARTS if p in chosen)


def peft_config_json(options, extras, arch, *, base_model: str | None) -> dict:
    """adapter_config.json for an export of `arch`; `extras` are the trainable groups saved
    whole (the modules `arch` has)."""
    groups = weight_map.group_modules(arch)
    modules_to_save = [m for group in extras for m in groups.get(group, ())]
    tied = arch.tie_word_embeddings
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": options.rank, "lora_alpha": options.alpha, "lora_dropout": options.dropout,
        "target_modules": [PART_TO_HF_MODULE[p] for p in options.parts],
        "modules_to_save": modules_to_save or None, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    if tied and "embed" in extras:
        config["ensure_weight_tying"] = True  # the lm_head is the (trained) embedding
    return config
