"""PEFT adapter directories <-> megalong LoRA adapters.

A PEFT LoRA directory holds adapter_config.json and adapter_model.safetensors (or .bin) with
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]` and `...lora_B.weight`
`[out, r]` per adapted HF linear, plus full copies of the `modules_to_save` (here the embedding
and norms) under their HF names. LongLoRA releases the embedding and norms separately, in
`trainable_params.bin`, with the same names. Both forms import; export writes the first.

adapter_config.json itself is read and written by config/peft.py (torch-free: the CLIs check an
adapter directory before importing torch).
"""

import json
import os
import re

from megalong.atomic import atomic_directory
from megalong.config import weight_map
from megalong.config.lora import LoraOptions
from megalong.config.peft import (CONFIG_FILE, EXTRA_MODULES, WEIGHT_FILES, ordered_parts,
                                  read_peft_config)
from megalong.config.weight_map import HF_MODULE_TO_PART, LORA_PARTS
from megalong.convert.layouts import tp_shard
from megalong.convert.model_io import iter_hf_tensors
from megalong.errors import MegalongError
from megalong.lora.apply import iter_adapters


_PREFIX = "base_model.model."
# A factor of any module under the adapted linears' parents (self_attn, mlp); unknown modules are
# reported by name.
_PARENTS = sorted({weight_map.PART_TO_HF[p].rsplit(".", 1)[0] for p in LORA_PARTS})
_FACTOR_KEY = re.compile(
    r"^(?:" + re.escape(_PREFIX) + r")?"
    + re.escape(weight_map.HF_LAYER).replace(re.escape("{i}"), r"(\d+)")
    + r"(?:" + "|".join(map(re.escape, _PARENTS)) + r")\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


# ------------------------------------------------------------------------------ reading tensors


class PeftAdapter:
    """A PEFT adapter read into memory: LoRA factors by (layer, part) and whole HF tensors
    (modules_to_save, LongLoRA's trainable_params.bin) by HF name."""

    def __init__(self, directory: str):
        self.directory = directory
        self.config = read_peft_config(directory)
        self.factors = {}  # (layer, part) -> {"A": tensor, "B": tensor}
        self.hf_tensors = {}  # HF name -> tensor
        files = [self.config["weights"]] + ([self.config["trainable_file"]]
                                             if self.config["trainable_file"] else [])
        for path in files:
            for key, tensor in _load_tensors(path).items():
                self._add(path, key, tensor)
        parts = ordered_parts(part for _, part in self.factors)
        if not parts:
            raise MegalongError(f"{self.config['weights']} holds no LoRA factors")
        if self.config["parts"] is not None and parts != self.config["parts"]:
            raise MegalongError(
                f"{directory}: adapter_config.json targets {', '.join(self.config['parts'])} but the "
                f"weights adapt {', '.join(parts)}")
        self.parts = parts

    def _add(self, path, key, tensor):
        match = _FACTOR_KEY.match(key)
        if match:
            layer, module, which = int(match.group(1)), match.group(2), match.group(3)
            if module not in HF_MODULE_TO_PART:
                raise MegalongError(f"{path}: {key} adapts {module}, which megalong cannot adapt")
            self.factors.setdefault((layer, HF_MODULE_TO_PART[module]), {})[which] = tensor
            return
        if ".original_module." in key:
            return  # PEFT's untouched copy of a module_to_save
        if "lora_" in key:
            raise MegalongError(f"{path}: cannot interpret {key}")
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        name = name.replace(".modules_to_save.default", "")
        if not (name.startswith("model.") or name.startswith("lm_head.")):
            raise MegalongError(f"{path}: cannot interpret {key} (not an HF Llama tensor name)")
        self.hf_tensors[name] = tensor

    def check_fits(self, arch) -> None:
        """Every factor and whole tensor has the shape the base architecture implies (checked
        before any model is built, so a mismatch costs no start-up)."""
        hidden, ffn, nh, ng = (arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
                               arch.num_kv_heads)
        linear_shapes = weight_map.linear_shapes(arch)
        beyond = sorted({layer for layer, _ in self.factors if layer >= arch.num_layers})
        if beyond:
            raise MegalongError(f"{self.directory}: the adapter has layer {beyond[0]}, but the base "
                                f"model has {arch.num_layers} layers")
        rank = self.config["rank"]
        for layer in range(arch.num_layers):
            for part in self.parts:
                fan_in, fan_out = linear_shapes[part]
                pair = self.factors.get((layer, part), {})
                for which, expected in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
                    key = factor_key(layer, part, which)
                    if which not in pair:
                        raise MegalongError(f"{self.directory}: {key} is missing")
                    if tuple(pair[which].shape) != expected:
                        raise MegalongError(
                            f"{self.directory}: {key} has shape {tuple(pair[which].shape)}; the base "
                            f"model (hidden {hidden}, {nh} heads, {ng} kv heads, ffn {ffn}) and r={rank} "
                            f"imply {expected}")
        for name, tensor in self.hf_tensors.items():
            expected = weight_map.hf_tensor_shape(name, arch)
            shape = tuple(tensor.shape)
            if shape != expected:  # (the vocabulary has grown to the adapter's embedding already)
                raise MegalongError(f"{self.directory}: {name} has shape {shape}; the base model "
                                    f"implies {expected if expected else 'no such tensor'}")

    def options(self):
        return LoraOptions(rank=self.config["rank"], alpha=self.config["alpha"],
                           dropout=self.config["dropout"], parts=self.parts)

    def extras(self) -> tuple:
        """The trainable groups the adapter carries whole (embed, norm)."""
        names = {name.rsplit(".", 2)[-2] for name in self.hf_tensors}
        return tuple(group for group, modules in EXTRA_MODULES.items() if names & set(modules))

    def vocab_rows(self):
        embed = self.hf_tensors.get(weight_map.HF_EMBEDDING)
        return None if embed is None else embed.shape[0]

    def overlay(self, get_base, arch):
        """An HF tensor getter: the adapter's whole tensors over the base checkpoint's. When the
        adapter's embedding has more rows than the base (LongLoRA's 32001 from an added pad token),
        the base lm_head grows by the mean of its rows, as LongLoRA's resize does."""
        import torch

        def get(name):
            if name in self.hf_tensors:
                tensor = self.hf_tensors[name]
                if name != weight_map.HF_EMBEDDING:
                    base_shape = tuple(get_base(name).shape)
                    if tuple(tensor.shape) != base_shape:
                        raise MegalongError(f"{self.directory}: {name} has shape {tuple(tensor.shape)}; "
                                            f"the base model's is {base_shape}")
                return tensor
            tensor = get_base(name)
            if name == weight_map.HF_OUTPUT and tensor.shape[0] < arch.vocab_size:
                extra = arch.vocab_size - tensor.shape[0]
                mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
                tensor = torch.cat([tensor, mean.expand(extra, -1)])
            return tensor

        return get


def factor_key(layer: int, part: str, which: str) -> str:
    return f"{_PREFIX}{weight_map.lora_module(part, layer)}.lora_{which}.weight"


def _load_tensors(path: str) -> dict:
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch.load raise assorted types on corrupt files
        raise MegalongError(f"cannot read {path}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MegalongError(f"{path} does not hold a state dict of tensors")
    return state


def load_lora_factors(model, adapter: PeftAdapter, num_layers: int) -> None:
    """Copy the adapter's factors into this rank's adapters (built by add_lora with
    adapter.options()), sharded for this TP rank. Shapes are checked against the base model."""
    import torch
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    beyond = sorted({layer for layer, _ in adapter.factors if layer >= num_layers})
    if beyond:
        raise MegalongError(f"{adapter.directory}: adapter has layer {beyond[0]}, but the base model has "
                            f"{num_layers} layers")
    with torch.no_grad():
        for layer, _, _, lora in iter_adapters(model):
            for part, factors in lora.factors():
                pair = adapter.factors.get((layer, part), {})
                fan_in, fan_out = lora.full_shapes[part]
                for which, expected in (("A", (lora.rank, fan_in)), ("B", (fan_out, lora.rank))):
                    key = factor_key(layer, part, which)
                    tensor = pair.get(which)
                    if tensor is None:
                        raise MegalongError(f"{adapter.directory}: {key} is missing")
                    if tuple(tensor.shape) != expected:
                        raise MegalongError(f"{adapter.directory}: {key} has shape {tuple(tensor.shape)}; "
                                            f"the base model implies {expected}")
                a, b = pair["A"], pair["B"]
                if lora.parallel == "column":
                    b = tp_shard(b, 0, tp_rank, tp_size)
                else:
                    a = tp_shard(a, 1, tp_rank, tp_size)
                factors.A.copy_(a)
                factors.B.copy_(b)


# ------------------------------------------------------------------------------ export


def iter_peft_tensors(model, arch, padded_vocab: int, extras):
    """(PEFT key, tensor) from a TP=1, PP=1 model with adapters: the factors, then the whole HF
    tensors of the `extras` groups (modules_to_save)."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise MegalongError("PEFT export reads a model built at TP=1, PP=1")
    for layer, _, _, lora in iter_adapters(model):
        for part, factors in lora.factors():
            yield factor_key(layer, part, "A"), factors.A.detach()
            yield factor_key(layer, part, "B"), factors.B.detach()
    groups = weight_map.group_modules(arch)
    modules = {m for group in extras for m in groups.get(group, ())}
    if modules:
        for name, tensor in iter_hf_tensors(model, arch, padded_vocab):
            if name.rsplit(".", 2)[-2] in modules:
                yield _PREFIX + name, tensor
                if name == weight_map.HF_EMBEDDING and arch.tie_word_embeddings:
                    # peft's ensure_weight_tying keeps a copy for the tied lm_head too
                    yield _PREFIX + weight_map.HF_OUTPUT, tensor.clone()


def write_peft_adapter(out: str, tensors, config: dict, *, overwrite: bool = False, dtype=None) -> str:
    """adapter_config.json + adapter_model.safetensors into `out`, all or nothing."""
    from safetensors.torch import save_file

    with atomic_directory(out, overwrite=overwrite, what="PEFT adapter directory") as staging:
        state = {key: (t if dtype is None else t.to(dtype)).contiguous() for key, t in tensors}
        save_file(state, os.path.join(staging, WEIGHT_FILES[0]), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as handle:
            json.dump(config, handle, indent=2)
    return out
