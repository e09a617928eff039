"""Layer specs against megatron-core's real spec functions, and Transformer Engine failures that
must become the install hint (TE itself is not installed on CPU machines)."""

import inspect

import pytest

from megalong.errors import MegalongError
from megalong.model import spec


class _Bound(Exception):
    """Raised by the wrapped spec function once megalong's arguments have bound."""


def test_te_spec_call_binds_to_megatron_signature(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    real = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
    calls = []

    def binding_only(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs))  # TypeError if it does not fit
        raise _Bound

    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", True)
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", binding_only)
    with pytest.raises(_Bound):
        spec.te_layer_spec(spec.core_attention_spec("s2", 16, "auto"))
    assert len(calls) == 1


def test_te_spec_without_te_gives_install_hint(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", False)
    with pytest.raises(MegalongError, match=r"pip install 'megalong\[gpu\]'.*--transformer-impl local"):
        spec.llama_block_spec(impl="transformer_engine", attention="s2", group_size=16,
                              kernel="auto", num_layers_this_stage=1)


@pytest.fixture
def broken_te(tmp_path, monkeypatch):
    """A transformer_engine package that is installed but cannot load its shared library."""
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise OSError('libcudart.so.12: cannot open shared object file: No such file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    for name in [n for n in sys.modules if n.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    return package


def test_te_that_fails_to_load_gives_hint_in_spec(broken_te, monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", False)  # what megatron's import found
    with pytest.raises(MegalongError, match="OSError: libcudart.so.12"):
        spec.te_layer_spec(spec.core_attention_spec("s2", 16, "auto"))


def test_te_that_fails_to_load_gives_hint_as_kernel(broken_te, monkeypatch):
    import torch

    from megalong.attention import kernels

    monkeypatch.setattr(kernels, "_instances", {})
    monkeypatch.setattr(kernels, "_import_errors", {})
    with pytest.raises(kernels.KernelUnavailableError,
                       match="Transformer Engine .*OSError|libcudart.so.12"):
        kernels.resolve_kernel("te", torch.device("cuda"), torch.bfloat16)
    assert "te" not in kernels.available_kernels()
