"""Move weights between HF tensors and a built megatron model on this rank (the layout maps
themselves are the pure functions in layouts.py)."""

from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megalong.config.arch import LlamaArch
from megalong.convert.layouts import (hf_to_megatron, local_to_te_key, megatron_to_hf,
                                      te_to_local_key)
from megalong.errors import MegalongError


def _uses_te(model) -> bool:
    return any(key.endswith("layer_norm_weight") for key in model.state_dict())


def load_hf_weights(model, get_hf, arch: LlamaArch, padded_vocab: int) -> None:
    """Fills this rank's shard of `model` (its TP rank, its PP stage) from HF tensors."""
    offset = get_transformer_layer_offset(model.config)
    num_local = len(model.decoder.layers)
    shards = hf_to_megatron(
        get_hf,
        arch,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        padded_vocab=padded_vocab,
        layer_range=(offset, offset + num_local),
        pre_process=model.pre_process,
        post_process=model.post_process,
    )
    if _uses_te(model):
        shards = {local_to_te_key(k): v for k, v in shards.items()}
    expected = model.state_dict()
    for key, tensor in shards.items():
        if key not in expected:
            raise MegalongError(f"converted tensor {key} has no place in the model")
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise MegalongError(
                f"{key}: converted shape {tuple(tensor.shape)} does not fit the model's "
                f"{tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in shards and not k.endswith("_extra_state")]
    if missing:
        raise MegalongError(f"no converted tensor for {', '.join(missing[:5])}")
    model.load_state_dict(shards, strict=False)


def iter_hf_tensors(model, arch: LlamaArch, padded_vocab: int):
    """HF (name, tensor) pairs, one at a time, from a TP=1, PP=1 model."""
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or not (
        model.pre_process and model.post_process
    ):
        raise MegalongError("export reads a model built at TP=1, PP=1")
    state = model.state_dict()
    if _uses_te(model):
        state = {_te_to_local(k): v for k, v in state.items()}
    return megatron_to_hf(lambda key: state[key].detach(), arch, padded_vocab=padded_vocab)


def _te_to_local(key: str) -> str:
    return te_to_local_key(key)
