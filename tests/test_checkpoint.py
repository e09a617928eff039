"""checkpoint.py: local-spec and Transformer-Engine-spec checkpoints load into each other, and
RNG states restore only on the device type they were saved on."""

import warnings

import pytest
import torch

from megalong.spawn import run_on_ranks

# The linears Transformer Engine replaces. megatron's local linears write an empty (None)
# `_extra_state` entry each "for compatibility with TE"; TE's hold FP8 metadata there.
_TE_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _set_extra_state(model, value) -> None:
    """value None: the linears write no `_extra_state` at all (a checkpoint from a tool whose
    linears have none); a number: they carry one as TE's do, and ignore None on load as TE does."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in _TE_LINEARS:
            continue
        base = type(module)
        if value is None:
            methods = {"get_extra_state": torch.nn.Module.get_extra_state,
                       "set_extra_state": torch.nn.Module.set_extra_state}
        else:
            methods = {"get_extra_state": lambda self: self.te_state,
                       "set_extra_state": lambda self, state: None if state is None
                       else setattr(self, "te_state", state)}
            module.te_state = torch.full((4,), float(value))
        module.__class__ = type(f"Extra{base.__name__}", (base,), methods)


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def checkpoints_with_and_without_extra_state(local_ckpt: str, out: str):
    """Every pair of {no `_extra_state`, megatron's local (None), TE-like (tensors)}: the
    checkpoint one writes loads into the others with the same weights."""
    from megalong import runtime
    from megalong.checkpoint import load_checkpoint, save_checkpoint
    from megalong.config.checkpoint import read_metadata
    from megalong.model.llama import ModelOptions, build_llama

    runtime.init_distributed()
    meta = read_metadata(local_ckpt)
    arch = meta.arch
    kinds = {"none": None, "local": "local", "te": 1.0}

    def build(kind):
        model = build_llama(arch, ModelOptions(seq_length=64, attention="full", initialize=False,
                                               padded_vocab_size=meta.padded_vocab_size))
        if kinds[kind] != "local":
            _set_extra_state(model, kinds[kind])
        return model

    reference = build("local")
    load_checkpoint([reference], local_ckpt)
    weights, te_states = {}, {}
    for writer in kinds:
        source = build(writer)
        load_checkpoint([source], local_ckpt)
        if writer == "te":
            source.decoder.layers[0].self_attention.linear_qkv.te_state = torch.full((4,), 3.0)
        save_checkpoint([source], f"{out}/{writer}", 1, meta)
        for reader in kinds:
            model = build(reader)
            load_checkpoint([model], f"{out}/{writer}")
            weights[writer, reader] = _weights(model)
            if reader == "te":
                te_states[writer] = float(model.decoder.layers[0].self_attention.linear_qkv
                                          .te_state[0])
    return _weights(reference), weights, te_states


@pytest.mark.slow
def test_checkpoints_with_and_without_extra_state_load_into_each_other(tiny_megatron_ckpt,
                                                                       tmp_path):
    (reference, weights, te_states), = run_on_ranks(checkpoints_with_and_without_extra_state, 1,
                                                    tiny_megatron_ckpt, str(tmp_path))
    assert len(weights) == 9
    for (writer, reader), loaded in weights.items():
        assert loaded.keys() == reference.keys(), (writer, reader)
        for key, value in reference.items():
            assert torch.equal(value, loaded[key]), (writer, reader, key)
    # TE-like state: restored from a TE-like checkpoint, left as built from the others.
    assert te_states == {"none": 1.0, "local": 1.0, "te": 3.0}


def _tracker_states(value: int, device: str) -> dict:
    """Generator states as the RNG tracker holds them on `device`: CPU generator states on
    CPU, a few bytes of Philox state on CUDA."""
    size = torch.get_rng_state().numel() if device == "cpu" else 16
    return {"model-parallel-rng": torch.full((size,), value, dtype=torch.uint8)}


@pytest.mark.parametrize("saved_on", ["cpu", "cuda", "legacy-cuda"])
def test_rng_state_restores_only_on_the_device_type_it_was_saved_on(saved_on, monkeypatch):
    import megatron.core.tensor_parallel as tensor_parallel

    from megalong import checkpoint

    tracker = tensor_parallel.random.CudaRNGStatesTracker()
    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda *a, **k: tracker)
    torch_state = torch.Generator().manual_seed(5).get_state()
    device = "cuda" if "cuda" in saved_on else "cpu"
    state = {"torch": torch_state, "tracker": _tracker_states(7, device)}
    if saved_on != "legacy-cuda":  # checkpoints before the device was recorded
        state["device"] = device
    before = torch.get_rng_state()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpoint._set_rng_state(state)
        assert torch.equal(torch.get_rng_state(), torch_state)  # the CPU stream exists on both
    finally:
        torch.set_rng_state(before)
    if device == "cpu":  # this test runs on CPU: same device type, restored
        assert not caught
        assert torch.equal(tracker.get_states()["model-parallel-rng"],
                           state["tracker"]["model-parallel-rng"])
    else:
        assert any("saved on cuda" in str(w.message) for w in caught)
        assert tracker.get_states() == {}


def test_saved_rng_state_records_its_device(monkeypatch):
    import megatron.core.tensor_parallel as tensor_parallel

    from megalong import checkpoint

    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker",
                        lambda *a, **k: tensor_parallel.random.CudaRNGStatesTracker())
    monkeypatch.setattr(checkpoint.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(checkpoint.dist, "get_rank", lambda: 0)
    monkeypatch.setenv("MEGALONG_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host, CPU forced
    state = checkpoint._rng_state().data
    assert state["device"] == "cpu" and "cuda" not in state
