"""HF config.json <-> LlamaArch, and parallel-size checks. Torch-free: CLIs run this before heavy work."""

import math
import os
from typing import Optional

from megalong.config.arch import FAMILIES, LlamaArch
from megalong.config.model import check_interpolation_factor
from megalong.config.yarn import hf_yarn_scaling, yarn_from_rope
from megalong.errors import MegalongError
from megalong.records import read_json_object


_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


_SUPPORTED_TYPES = ", ".join(FAMILIES)
# Mixture-of-experts keys of transformers' MoE configs (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek).
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _family(cfg: dict, source: str):
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures") or []
    if model_type is None:  # an old config.json: the class names the family
        model_type = next((f.model_type for f in FAMILIES.values() if f.architecture in architectures), None)
    if model_type not in FAMILIES:
        raise MegalongError(
            f"{source}: model_type {model_type!r} is not supported; megalong converts model_type "
            f"{_SUPPORTED_TYPES}"
        )
    family = FAMILIES[model_type]
    if architectures and family.architecture not in architectures:
        raise MegalongError(f"{source}: architectures {architectures} do not include {family.architecture}")
    for key in _MOE_KEYS:
        if cfg.get(key):
            raise MegalongError(
                f"{source}: {key} is {cfg[key]!r}; megalong supports dense models only ({key} absent or 0)"
            )
    return family


def _sliding_window(cfg: dict, family, num_layers: int, source: str) -> Optional[int]:
    """The sliding window transformers applies for this config, or None when no layer slides.
    Mistral slides whenever sliding_window is set (4096 when absent); Qwen2/Qwen3 only with
    use_sliding_window, on the layers layer_types (or max_window_layers) name."""
    if family.model_type == "mistral":
        window = cfg.get("sliding_window", family.default_sliding_window)
    elif family.model_type in ("qwen2", "qwen3"):
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
        layer_types = cfg.get("layer_types")
        if window is not None and layer_types is None:
            sliding = num_layers > cfg.get("max_window_layers", 28)
        else:
            sliding = window is not None and "sliding_attention" in (layer_types or ())
        window = window if sliding else None
    else:
        window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise MegalongError(f"{source}: sliding_window must be null or a positive integer, got {window!r}")
    return window


def arch_from_hf_config(cfg: dict, source: str) -> tuple[LlamaArch, Optional[float]]:
    """(arch, linear interpolation factor or None) from a config.json dict read from `source`."""
    family = _family(cfg, source)
    checks = [("hidden_act", "silu")]
    if family.model_type in ("llama", "qwen3"):
        checks.append(("attention_bias", False))
    if family.model_type == "llama":
        checks.append(("mlp_bias", False))
    for key, want in checks:
        if cfg.get(key, want) != want:
            raise MegalongError(f"{source}: {key} is {cfg[key]!r}; megalong supports only {want!r}")

    def positive_int(key, default=None):
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise MegalongError(f"{source}: {key} must be a positive integer, got {value!r}")
        return value

    hidden = positive_int("hidden_size")
    heads = positive_int("num_attention_heads")
    kv_heads = positive_int("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim", family.default_head_dim)
    if head_dim is not None:
        head_dim = positive_int("head_dim")
    if heads % kv_heads:
        raise MegalongError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    if head_dim is None and hidden % heads:
        raise MegalongError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")

    theta, rope_type, rope = _rope_settings(cfg, source)
    interpolation, llama3_rope, yarn_rope = None, None, None
    if rope_type == "yarn":
        yarn_rope = yarn_from_rope(rope, cfg, source)
    elif rope_type == "linear":
        interpolation = check_interpolation_factor(rope.get("factor"), f"{source}: rope scaling factor")
    elif rope_type == "llama3":
        missing = [k for k in _LLAMA3_ROPE_KEYS if k not in rope]
        if missing:
            raise MegalongError(f"{source}: llama3 rope scaling lacks {missing}")
        llama3_rope = {k: rope[k] for k in _LLAMA3_ROPE_KEYS}
    elif rope_type != "default":
        raise MegalongError(
            f"{source}: rope type {rope_type!r} is not supported; megalong supports default, linear, llama3 and yarn RoPE"
        )

    num_layers = positive_int("num_hidden_layers")
    arch = LlamaArch(
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        ffn_hidden_size=positive_int("intermediate_size"),
        vocab_size=positive_int("vocab_size"),
        max_position_embeddings=positive_int("max_position_embeddings", 2048),
        rope_theta=theta,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        llama3_rope=llama3_rope,
        yarn_rope=yarn_rope,
        head_dim_override=head_dim if head_dim is not None and head_dim * heads != hidden else None,
        family=family.model_type,
        sliding_window=_sliding_window(cfg, family, num_layers, source),
    )
    return arch, interpolation


def _rope_settings(cfg: dict, source: str) -> tuple[float, str, dict]:
    """(rope_theta, rope type, scaling dict) from `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise MegalongError(f"{source}: {name} must be an object, got {value!r}")

    def kind(d):
        return d.get("rope_type") or d.get("type") or "default"

    shared = (set(params) & set(scaling)) - {"type", "rope_type", "rope_theta"}
    if params and scaling and (
        (kind(params), params.get("factor")) != (kind(scaling), scaling.get("factor"))
        or any(params[key] != scaling[key] for key in shared)
    ):
        raise MegalongError(
            f"{source}: rope_scaling {scaling} and rope_parameters {params} disagree; remove one of them"
        )
    rope = scaling or params
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    theta = _positive_float({"rope_theta": theta}, "rope_theta", source)
    return theta, kind(rope), rope


def _positive_float(d: dict, key: str, source: str) -> float:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise MegalongError(f"{source}: {key} must be a positive number, got {value!r}")
    return float(value)


# Keys of a base model's config.json that hf_config_from_arch carries over (generation-relevant ids).
_CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_config_from_arch(
    arch: LlamaArch,
    *,
    interpolation_factor: Optional[float],
    torch_dtype: str = "float32",
    base_config: Optional[dict] = None,
) -> dict:
    """A config.json dict of the arch's family (LlamaForCausalLM, MistralForCausalLM, ...) readable
    by transformers 4.x, 5.x and vLLM.

    max_position_embeddings stays at the original length; linear interpolation (or YaRN, or
    llama3 scaling) is recorded both
    as `rope_scaling` + top-level `rope_theta` (4.x, vLLM) and as `rope_parameters` (5.x).
    Token ids (bos/eos/pad) come from `base_config` when given.
    """
    theta = float(arch.rope_theta)
    if arch.yarn_rope is not None:
        if interpolation_factor is not None:
            raise MegalongError(
                "linear interpolation on top of YaRN cannot be written to config.json; "
                "train YaRN models without --rotary-seq-len-interpolation-factor"
            )
        rope_scaling, rope_parameters = hf_yarn_scaling(arch.yarn_rope, theta)
    elif arch.llama3_rope is not None:
        if interpolation_factor is not None:
            raise MegalongError(
                "linear interpolation on top of llama3 RoPE scaling cannot be written to config.json; "
                "train Llama-3 models without --rotary-seq-len-interpolation-factor"
            )
        scaling = {"rope_type": "llama3", **arch.llama3_rope}
        rope_scaling, rope_parameters = dict(scaling), {**scaling, "rope_theta": theta}
    elif interpolation_factor is not None:
        factor = float(interpolation_factor)
        rope_scaling = {"type": "linear", "rope_type": "linear", "factor": factor}
        rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    else:
        rope_scaling, rope_parameters = None, {"rope_type": "default", "rope_theta": theta}

    family = FAMILIES[arch.family]
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "vocab_size": arch.vocab_size,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if family.model_type in ("llama", "qwen3"):
        config["attention_bias"] = False
    if family.model_type == "llama":
        config["mlp_bias"] = False
    if family.model_type == "mistral":  # null: no sliding (MistralConfig's default is 4096)
        config["sliding_window"] = arch.sliding_window
    elif family.model_type in ("qwen2", "qwen3"):
        sliding = arch.sliding_window is not None
        config.update(use_sliding_window=sliding, sliding_window=arch.sliding_window,
                      max_window_layers=0 if sliding else arch.num_layers,
                      layer_types=[("sliding" if sliding else "full") + "_attention"] * arch.num_layers)
    for key in _CARRIED_KEYS:
        if base_config and key in base_config:
            config[key] = base_config[key]
    return config


def read_hf_dir_config(hf_dir: str, flag: str = "--hf-dir") -> tuple[dict, str]:
    """(config.json of an HF model directory, its path), with the error naming the flag."""
    if not os.path.isdir(hf_dir):
        raise MegalongError(f"{flag} {hf_dir} does not exist")
    path = os.path.join(hf_dir, "config.json")
    return read_json_object(path, f"{flag} must be an HF model directory"), path
