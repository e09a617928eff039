"""YaRN RoPE scaling (arXiv 2309.00071) next to linear interpolation: read from and written to
config.json as transformers does, chosen by flag for a checkpoint without it, and turned into
the `yarn_*` attributes megatron-core's GPTModel reads (torch-free).

A LlamaArch carries YaRN as `yarn_rope`, the keys of transformers' `rope_type: "yarn"`
parameters that the model's config.json gave (so export writes back what import read):
`factor` and `original_max_position_embeddings` always; `beta_fast`, `beta_slow`, `mscale`,
`mscale_all_dim`, `truncate`, `attention_factor` when given.

transformers and megatron-core compute the same inverse frequencies from the same parameters
(`truncate` is megatron's `correction_range_round_to_int`). They differ in the attention factor
that scales cos and sin (so q·k by its square): transformers takes `attention_factor`, else
mscale(s, mscale) / mscale(s, mscale_all_dim) when both are non-zero, else 0.1 ln s + 1;
megatron takes the ratio whenever both are set (not None), and has no `attention_factor`.
`megatron_yarn_attributes` picks megatron's mscale pair that gives transformers' factor."""

import math
from typing import Optional

from megalong.errors import MegalongError


# transformers' yarn parameters (besides rope_type and rope_theta), in the order written.
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate", "attention_factor")
# The flags' names, megatron-core's TransformerConfig attribute names (--yarn-...).
ROPE_TYPES = ("rope", "yarn")


def _number(value, what: str, *, minimum: Optional[float] = None, positive: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (minimum is not None and value < minimum) or (positive and value <= 0)):
        bound = f" >= {minimum:g}" if minimum is not None else " > 0" if positive else ""
        raise MegalongError(f"{what} must be a finite number{bound}, got {value!r}")
    return value


def yarn_from_rope(rope: dict, cfg: dict, source: str) -> dict:
    """arch.yarn_rope from a config.json's `rope_type: "yarn"` scaling dict `rope` (cfg: the
    whole config.json, for transformers' fallbacks of original_max_position_embeddings)."""
    unknown = sorted(set(rope) - set(YARN_KEYS) - {"type", "rope_type", "rope_theta"})
    if unknown:
        raise MegalongError(f"{source}: yarn rope scaling has unknown keys {unknown}; "
                            f"supported: {', '.join(YARN_KEYS)}")
    yarn = {key: rope[key] for key in YARN_KEYS if rope.get(key) is not None}
    if "factor" not in yarn:
        raise MegalongError(f"{source}: yarn rope scaling lacks 'factor'")
    # transformers' order: a top-level original_max_position_embeddings (Phi-3 style) wins,
    # then the rope dict's, then max_position_embeddings.
    original = (cfg.get("original_max_position_embeddings")
                or yarn.get("original_max_position_embeddings")
                or cfg.get("max_position_embeddings"))
    yarn["original_max_position_embeddings"] = original
    check_yarn(yarn, f"{source}: yarn rope scaling")
    return yarn


def check_yarn(yarn: dict, what: str) -> None:
    """The one rule for YaRN parameters (a config.json's or the flags')."""
    _number(yarn.get("factor"), f"{what} factor", minimum=1)
    original = yarn.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise MegalongError(f"{what} original_max_position_embeddings must be a positive "
                            f"integer, got {original!r}")
    for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if yarn.get(key) is not None:
            _number(yarn[key], f"{what} {key}")
    if yarn.get("attention_factor") is not None:
        _number(yarn["attention_factor"], f"{what} attention_factor", positive=True)
    if "truncate" in yarn and not isinstance(yarn["truncate"], bool):
        raise MegalongError(f"{what} truncate must be true or false, got {yarn['truncate']!r}")
    if (yarn.get("beta_fast") or 32) < (yarn.get("beta_slow") or 1):
        raise MegalongError(f"{what} beta_fast {yarn.get('beta_fast') or 32} must be at least "
                            f"beta_slow {yarn.get('beta_slow') or 1}")
    if yarn["factor"] <= 1 and attention_factor(yarn) != 1.0:
        raise MegalongError(f"{what}: attention_factor {yarn['attention_factor']} with factor "
                            f"{yarn['factor']} (<= 1) is not supported: megatron-core's YaRN "
                            "scales attention only when factor > 1")


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(yarn: dict) -> float:
    """transformers' YaRN attention factor (the scale of cos and sin), from its rules."""
    if yarn.get("attention_factor") is not None:
        return float(yarn["attention_factor"])
    factor, mscale, mscale_all_dim = (yarn["factor"], yarn.get("mscale"),
                                      yarn.get("mscale_all_dim"))
    if mscale and mscale_all_dim:
        return _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
    return _mscale(factor)


def megatron_yarn_attributes(yarn: dict) -> dict:
    """Every `yarn_*` attribute megatron-core 0.16's GPTModel and attention read (with bare
    getattr: TransformerConfig declares none) for transformers' YaRN `yarn`."""
    factor = float(yarn["factor"])
    mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if yarn.get("attention_factor") is not None:
        if factor > 1:  # megatron: (0.1 m ln s + 1) / 1 with mscale_all_dim 0
            mscale, mscale_all_dim = (yarn["attention_factor"] - 1) / (0.1 * math.log(factor)), 0.0
        else:
            mscale = mscale_all_dim = None  # 1 either way (check_yarn)
    elif not (mscale and mscale_all_dim):  # transformers' 0.1 ln s + 1: megatron's None rule
        mscale = mscale_all_dim = None
    return {
        "yarn_rotary_scaling_factor": factor,
        "yarn_original_max_position_embeddings": int(yarn["original_max_position_embeddings"]),
        "yarn_beta_fast": float(yarn.get("beta_fast") or 32),
        "yarn_beta_slow": float(yarn.get("beta_slow") or 1),
        "yarn_mscale": None if mscale is None else float(mscale),
        "yarn_mscale_all_dim": None if mscale_all_dim is None else float(mscale_all_dim),
        "yarn_correction_range_round_to_int": bool(yarn.get("truncate", True)),
    }


def megatron_concentration(attributes: dict) -> float:
    """megatron-core's `_yarn_get_concentration_factor` for `megatron_yarn_attributes`' output
    (torch-free: tests check it equals attention_factor)."""
    scale, mscale, mscale_all_dim = (attributes["yarn_rotary_scaling_factor"],
                                     attributes["yarn_mscale"], attributes["yarn_mscale_all_dim"])
    if mscale is None or mscale_all_dim is None:
        return _mscale(scale)
    return _mscale(scale, mscale) / _mscale(scale, mscale_all_dim)


def hf_yarn_scaling(yarn: dict, theta: float) -> tuple[dict, dict]:
    """(rope_scaling for transformers 4.x and vLLM, rope_parameters for 5.x)."""
    params = {key: yarn[key] for key in YARN_KEYS if key in yarn}
    return ({"type": "yarn", "rope_type": "yarn", **params},
            {"rope_type": "yarn", **params, "rope_theta": theta})


def yarn_from_flags(*, factor: Optional[float], original: int, seq_length: int,
                    beta_fast=None, beta_slow=None, mscale=None, mscale_all_dim=None) -> dict:
    """arch.yarn_rope chosen by --rope-type yarn for a checkpoint without YaRN: the factor
    defaults to ceil(seq-length / original length), as linear interpolation's does."""
    if factor is None:
        if seq_length <= original:
            raise MegalongError(f"--rope-type yarn: seq-length {seq_length} is not beyond the "
                                f"model's original length {original}; give "
                                "--yarn-rotary-scaling-factor")
        factor = float(math.ceil(seq_length / original))
    yarn = {"factor": float(factor), "original_max_position_embeddings": original}
    for key, value in (("beta_fast", beta_fast), ("beta_slow", beta_slow), ("mscale", mscale),
                       ("mscale_all_dim", mscale_all_dim)):
        if value is not None:
            yarn[key] = float(value)
    check_yarn(yarn, "--rope-type yarn")
    return yarn


def refuse_linear_with_yarn(yarn: Optional[dict], factor: Optional[float], where: str) -> None:
    """YaRN and linear interpolation together are refused (one line, before torch)."""
    if yarn is not None and factor is not None:
        raise MegalongError(f"YaRN cannot be combined with linear interpolation ({where} factor "
                            f"{factor:g}); the model's config uses YaRN {yarn}")
