"""HF config.json <-> LlamaArch, and parallel-size checks. Torch-free: CLIs run this before heavy work."""

import math
import os
from typing import Optional

from megalong.config.arch import LlamaArch
from megalong.config.model import check_interpolation_factor
from megalong.config.yarn import hf_yarn_scaling, yarn_from_rope
from megalong.errors import MegalongError
from megalong.records import read_json_object







_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def arch_from_hf_config(cfg: dict, source: str) -> tuple[LlamaArch, Optional[float]]:
    """(arch, linear interpolation factor or None) from a config.json dict read from `source`."""
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures") or []
    if model_type != "llama" and not (model_type is None and "LlamaForCausalLM" in architectures):
        raise MegalongError(
            f"{source}: model_type {model_type!r} is not supported; megalong converts Llama models (model_type 'llama')"
        )
    if architectures and "LlamaForCausalLM" not in architectures:
        raise MegalongError(f"{source}: architectures {architectures} do not include LlamaForCausalLM")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
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
    head_dim = cfg.get("head_dim")
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

    arch = LlamaArch(
        hidden_size=hidden,
        num_layers=positive_int("num_hidden_layers"),
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
    """A LlamaForCausalLM config.json dict readable by transformers 4.x, 5.x and vLLM.

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

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "vocab_size": arch.vocab_size,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
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
