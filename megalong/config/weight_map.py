"""The HF Llama <-> megatron-core weight map (DESIGN.md §4, STYLE.md §7): one table, torch-free.

Every megatron-core parameter of a Llama GPTModel is one `Mapping`: its local-spec key, the HF
tensors it is made of (with their shapes as names of `LlamaArch` sizes), how they combine (its
kind), how tensor parallelism splits it, its Transformer-Engine-spec key where that differs, and
which LoRA parts and trainable groups it carries. Conversion both ways (`convert/layouts.py`,
whose pure tensor functions are the kinds' transforms), PEFT key names and shape checks
(`lora/peft_io.py`, `lora/options.py`), LoRA adapter geometry (`lora/apply.py`), random HF models
(`convert/random_hf.py`), the TE key aliases (`model/spec.py`) and the planner (`plan.py`) all
read this table. Another model family is another table.

Keys are templates: `{i}` is the layer index (global in HF names, local to the pipeline stage in
megatron keys). HF linear weights are `[out, in]`; a LoRA part's geometry is `(in, out)`.
"""

import re
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

# How a megatron parameter is made of its HF tensors (transforms: convert/layouts.py).
ONE_TO_ONE = "one_to_one"  # the same tensor (TP-split along tp_dim, or replicated)
QKV = "qkv"  # q, k, v rows interleaved per kv group (qkv_hf_to_megatron), split on rows
GATED_MLP = "gated_mlp"  # each TP rank holds [its gate rows; its up rows] (fc1_shard)
VOCAB = "vocab"  # rows padded to the padded vocab size, then split on rows

# Where a parameter lives in the pipeline.
FIRST_STAGE, LAYER, LAST_STAGE = "first", "layer", "last"

HF_LAYER = "model.layers.{i}."
MEGATRON_LAYER = "decoder.layers.{i}."
WEIGHT = "weight"


@dataclass(frozen=True)
class HFTensor:
    name: str  # template, e.g. "model.layers.{i}.self_attn.q_proj.weight"
    shape: Tuple[str, ...]  # LlamaArch size names (LlamaArch.dim)
    part: Optional[str] = None  # the LoRA part adapting this linear ("q", ..., "down")

    @property
    def module(self) -> str:
        """The HF module path: "model.layers.{i}.self_attn.q_proj"."""
        return self.name.rsplit(".", 1)[0]

    @property
    def module_name(self) -> str:
        """The module's own name (PEFT's target_modules / modules_to_save): "q_proj"."""
        return self.module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Mapping:
    megatron: str  # local-spec key template
    kind: str  # ONE_TO_ONE | QKV | GATED_MLP | VOCAB
    hf: Tuple[HFTensor, ...]  # in HF's order
    tp_dim: Optional[int]  # 0: rows split (column-parallel), 1: columns (row-parallel), None: replicated
    stage: str = LAYER  # FIRST_STAGE | LAYER | LAST_STAGE
    te: Optional[str] = None  # Transformer-Engine-spec key template, where it differs
    group: Optional[str] = None  # --trainable-params group that trains it whole ("embed", "norm")
    tied_to: Optional[str] = None  # with tied embeddings: the HF tensor it is (not saved itself)
    # The LlamaArch feature (a bool property: "qkv_bias", "qk_layernorm") without which the
    # parameter does not exist; None: every family has it.
    needs: Optional[str] = None

    @property
    def per_layer(self) -> bool:
        return self.stage == LAYER

    @property
    def module(self) -> str:
        """The megatron module path inside a layer (or the model): "self_attention.linear_qkv"."""
        key = self.megatron[len(MEGATRON_LAYER):] if self.per_layer else self.megatron
        return key.rsplit(".", 1)[0]

    def exists(self, arch) -> bool:
        return self.needs is None or bool(getattr(arch, self.needs))

    @property
    def parts(self) -> Tuple[str, ...]:
        return tuple(t.part for t in self.hf if t.part)


def _linear(name: str, out: str, inp: str, part: str) -> HFTensor:
    return HFTensor(HF_LAYER + name + "." + WEIGHT, (out, inp), part)


def _norm(name: str, size: str = "hidden_size") -> HFTensor:
    return HFTensor(name + "." + WEIGHT, (size,))


def _bias(name: str, out: str) -> HFTensor:
    return HFTensor(HF_LAYER + name + ".bias", (out,))


_EMBED_TOKENS = HFTensor("model.embed_tokens.weight", ("vocab_size", "hidden_size"))

# The table, in HF's tensor order (exports and random models write tensors in this order; the
# q/k/v biases come after the weights). Entries with `needs` exist only in the families that have
# the feature (config/arch.py FAMILIES): Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorms.
LLAMA: Tuple[Mapping, ...] = (
    Mapping("embedding.word_embeddings.weight", VOCAB, (_EMBED_TOKENS,), tp_dim=0,
            stage=FIRST_STAGE, group="embed"),
    Mapping(MEGATRON_LAYER + "self_attention.linear_qkv.weight", QKV,
            (_linear("self_attn.q_proj", "q_size", "hidden_size", "q"),
             _linear("self_attn.k_proj", "kv_size", "hidden_size", "k"),
             _linear("self_attn.v_proj", "kv_size", "hidden_size", "v")), tp_dim=0),
    # Interleaved and TP-split like the weight's rows.
    Mapping(MEGATRON_LAYER + "self_attention.linear_qkv.bias", QKV,
            (_bias("self_attn.q_proj", "q_size"), _bias("self_attn.k_proj", "kv_size"),
             _bias("self_attn.v_proj", "kv_size")), tp_dim=0, needs="qkv_bias"),
    Mapping(MEGATRON_LAYER + "self_attention.linear_proj.weight", ONE_TO_ONE,
            (_linear("self_attn.o_proj", "hidden_size", "q_size", "o"),), tp_dim=1),
    # Replicated over TP (every rank normalises its own heads with the same weight); megatron's
    # finalize_model_grads sums their gradients over TP when TransformerConfig.qk_layernorm.
    Mapping(MEGATRON_LAYER + "self_attention.q_layernorm.weight", ONE_TO_ONE,
            (_norm(HF_LAYER + "self_attn.q_norm", "head_dim"),), tp_dim=None, group="norm",
            needs="qk_layernorm"),
    Mapping(MEGATRON_LAYER + "self_attention.k_layernorm.weight", ONE_TO_ONE,
            (_norm(HF_LAYER + "self_attn.k_norm", "head_dim"),), tp_dim=None, group="norm",
            needs="qk_layernorm"),
    Mapping(MEGATRON_LAYER + "mlp.linear_fc1.weight", GATED_MLP,
            (_linear("mlp.gate_proj", "ffn_hidden_size", "hidden_size", "gate"),
             _linear("mlp.up_proj", "ffn_hidden_size", "hidden_size", "up")), tp_dim=0),
    Mapping(MEGATRON_LAYER + "mlp.linear_fc2.weight", ONE_TO_ONE,
            (_linear("mlp.down_proj", "hidden_size", "ffn_hidden_size", "down"),), tp_dim=1),
    Mapping(MEGATRON_LAYER + "input_layernorm.weight", ONE_TO_ONE,
            (_norm(HF_LAYER + "input_layernorm"),), tp_dim=None,
            te=MEGATRON_LAYER + "self_attention.linear_qkv.layer_norm_weight", group="norm"),
    Mapping(MEGATRON_LAYER + "pre_mlp_layernorm.weight", ONE_TO_ONE,
            (_norm(HF_LAYER + "post_attention_layernorm"),), tp_dim=None,
            te=MEGATRON_LAYER + "mlp.linear_fc1.layer_norm_weight", group="norm"),
    Mapping("decoder.final_layernorm.weight", ONE_TO_ONE, (_norm("model.norm"),), tp_dim=None,
            stage=LAST_STAGE, group="norm"),
    Mapping("output_layer.weight", VOCAB,
            (HFTensor("lm_head.weight", ("vocab_size", "hidden_size")),), tp_dim=0,
            stage=LAST_STAGE, tied_to=_EMBED_TOKENS.name),
)


# ------------------------------------------------------------------------------ derived tables

_PARTS = {t.part: (m, t) for m in LLAMA for t in m.hf if t.part}  # part -> (Mapping, HFTensor)
LORA_PARTS: Tuple[str, ...] = tuple(_PARTS)  # ("q", "k", "v", "o", "gate", "up", "down")
# Megatron linear name ("linear_qkv") -> its Mapping, for the linears LoRA adapts.
LINEARS: Dict[str, Mapping] = {m.module.rsplit(".", 1)[-1]: m for m in LLAMA if m.parts}
PART_TO_LINEAR: Dict[str, str] = {p: m.module.rsplit(".", 1)[-1] for p, (m, _) in _PARTS.items()}
# LoRA part -> HF module path inside a layer ("self_attn.q_proj"), and the module's own name.
PART_TO_HF: Dict[str, str] = {p: t.module[len(HF_LAYER):] for p, (_, t) in _PARTS.items()}
PART_TO_HF_MODULE: Dict[str, str] = {p: t.module_name for p, (_, t) in _PARTS.items()}
HF_MODULE_TO_PART: Dict[str, str] = {module: p for p, module in PART_TO_HF_MODULE.items()}


def group_modules(arch=None) -> Dict[str, Tuple[str, ...]]:
    """--trainable-params group -> the HF module names it trains whole (PEFT modules_to_save):
    those `arch` has, or those of any family without it."""
    groups: Dict[str, Tuple[str, ...]] = {}
    for m in LLAMA:
        if m.group and (arch is None or m.exists(arch)):
            groups[m.group] = groups.get(m.group, ()) + tuple(t.module_name for t in m.hf)
    return groups


# Every family's: what a PEFT adapter's modules_to_save may name.
GROUP_MODULES: Dict[str, Tuple[str, ...]] = group_modules()


# The vocabulary-sized tensors, by name (the tie, the grown vocabulary and the trainable embedding
# are decided by name in the LoRA code).
_EMBEDDING = next(m for m in LLAMA if m.kind == VOCAB and m.stage == FIRST_STAGE)
_OUTPUT = next(m for m in LLAMA if m.kind == VOCAB and m.stage == LAST_STAGE)
HF_EMBEDDING, MEGATRON_EMBEDDING = _EMBEDDING.hf[0].name, _EMBEDDING.megatron
HF_OUTPUT, MEGATRON_OUTPUT = _OUTPUT.hf[0].name, _OUTPUT.megatron


def linear_parent(linear: str) -> str:
    """The megatron module holding a linear: "linear_qkv" -> "self_attention"."""
    return LINEARS[linear].module.rsplit(".", 1)[0]


def lora_module(part: str, layer: int) -> str:
    """The HF module a LoRA part adapts in `layer`: "model.layers.3.self_attn.q_proj"."""
    return _PARTS[part][1].module.format(i=layer)


# ------------------------------------------------------------------------------ shapes


def hf_shape(tensor: HFTensor, arch) -> Tuple[int, ...]:
    return tuple(arch.dim(name) for name in tensor.shape)


def linear_shapes(arch) -> Dict[str, Tuple[int, int]]:
    """{LoRA part: (in, out)} of the full HF linears."""
    shapes = {}
    for part, (_, tensor) in _PARTS.items():
        out, inp = hf_shape(tensor, arch)
        shapes[part] = (inp, out)
    return shapes


def linear_params(arch) -> Dict[str, int]:
    """Weights of one layer's megatron linears (whole, not TP shards), by linear name."""
    result = {}
    for linear, mapping in LINEARS.items():
        total = 0
        for tensor in mapping.hf:
            out, inp = hf_shape(tensor, arch)
            total += out * inp
        result[linear] = total
    return result


def megatron_shape(mapping: Mapping, arch, *, padded_vocab: int, tp: int = 1) -> Tuple[int, ...]:
    """The shape of one TP rank's shard of a megatron parameter."""
    shape = list(hf_shape(mapping.hf[0], arch))
    shape[0] = sum(hf_shape(t, arch)[0] for t in mapping.hf)  # fused parts stack their rows
    if mapping.kind == VOCAB:
        shape[0] = padded_vocab
    if mapping.tp_dim is not None:
        shape[mapping.tp_dim] //= tp
    return tuple(shape)


# ------------------------------------------------------------------------------ which tensors


def stage_mappings(arch, *, pre_process: bool = True, post_process: bool = True) -> Iterator[Mapping]:
    """The mappings a pipeline stage holds (layers included), in the table's order. With tied
    embeddings the output layer exists only on a last stage without the embedding (megatron-core
    keeps its own copy there)."""
    for mapping in LLAMA:
        if not mapping.exists(arch):
            continue
        if mapping.stage == FIRST_STAGE and not pre_process:
            continue
        if mapping.stage == LAST_STAGE and not post_process:
            continue
        if mapping.tied_to and arch.tie_word_embeddings and pre_process:
            continue
        yield mapping


def placed(arch, layers, *, pre_process: bool = True, post_process: bool = True):
    """(mapping, layer) in HF's order: the first stage's, then layer by layer over `layers` (a
    range of HF layer indices), then the last stage's; layer is None outside the layers."""
    mappings = list(stage_mappings(arch, pre_process=pre_process, post_process=post_process))
    for stage in (FIRST_STAGE, LAYER, LAST_STAGE):
        here = [m for m in mappings if m.stage == stage]
        for layer in layers if stage == LAYER else (None,):
            for mapping in here:
                yield mapping, layer


def hf_names(mapping: Mapping, arch) -> Tuple[str, ...]:
    """The HF tensor templates a mapping reads on import (a tied output layer reads the embedding)."""
    if mapping.tied_to and arch.tie_word_embeddings:
        return (mapping.tied_to,)
    return tuple(t.name for t in mapping.hf)


def hf_tensor_shapes(arch) -> Iterator[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every tensor of an HF checkpoint of `arch` (its family's class), in the
    table's order."""
    for mapping, layer in placed(arch, range(arch.num_layers)):
        for tensor in mapping.hf:
            yield at(tensor.name, layer), hf_shape(tensor, arch)


def at(template: str, layer) -> str:
    """A key template at a layer (None: a key outside the layers)."""
    return template if layer is None else template.format(i=layer)


def _name_pattern(template: str):
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_HF_PATTERNS = tuple((_name_pattern(t.name), t, m) for m in LLAMA for t in m.hf)


def hf_tensor_shape(name: str, arch) -> Optional[Tuple[int, ...]]:
    """The shape of an HF tensor of `arch` by name (lm_head included when tied), or None when
    `arch` has no such tensor."""
    for pattern, tensor, mapping in _HF_PATTERNS:
        match = pattern.match(name)
        if match:
            if not mapping.exists(arch):
                return None
            if match.groups() and int(match.group(1)) >= arch.num_layers:
                return None
            return hf_shape(tensor, arch)
    return None


# ------------------------------------------------------------------------------ TE spec keys


def _layer_suffix(template: str) -> str:
    return template[len(MEGATRON_LAYER) - 1:]  # ".input_layernorm.weight"


_LOCAL_TO_TE = {_layer_suffix(m.megatron): _layer_suffix(m.te) for m in LLAMA if m.te}
_TE_TO_LOCAL = {te: local for local, te in _LOCAL_TO_TE.items()}


def te_key(key: str) -> str:
    """A local-spec key's Transformer-Engine-spec name (TE fuses the norms into the next linear):
    decoder.layers.{j}.input_layernorm.weight -> ...self_attention.linear_qkv.layer_norm_weight.
    Other keys pass through unchanged."""
    return _swap_suffix(key, _LOCAL_TO_TE)


def local_key(key: str) -> str:
    """Inverse of te_key."""
    return _swap_suffix(key, _TE_TO_LOCAL)


def _swap_suffix(key: str, table: Dict[str, str]) -> str:
    for old, new in table.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def te_module_prefixes() -> Dict[str, str]:
    """Layer-relative module prefixes, local -> TE, as megatron's `sharded_state_dict_keys_map`
    takes them: {"input_layernorm.": "self_attention.linear_qkv.layer_norm_", ...}."""
    return {local[1:-len(WEIGHT)]: te[1:-len(WEIGHT)] for local, te in _LOCAL_TO_TE.items()}
