"""megalong's SwiGLU MLP (model/swiglu.py) against megatron's own MLP on the same weights:
equal outputs and gradients, one ffn-wide tensor less kept for the backward."""

import pytest
import torch
import torch.nn.functional as F

from test_attention import model_parallel  # noqa: F401  (fixture)


def _saved_bytes_and_results(module, x, grad):
    """Bytes of the distinct non-parameter storages the forward saves for the backward; the
    output, the input gradient and the weight gradients."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, bias = module(x)
    assert bias is None
    out.backward(grad)
    return sum(saved.values()), [out, x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_mlp_equals_megatron_mlp_and_keeps_less(model_parallel, dtype):  # noqa: F811
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megalong.model.swiglu import SwiGLUMLP

    tokens, batch, hidden, ffn = 24, 2, 32, 48
    config = TransformerConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=ffn,
                               num_attention_heads=4, gated_linear_unit=True,
                               activation_func=F.silu, add_bias_linear=False,
                               bias_activation_fusion=False, use_cpu_initialization=True,
                               params_dtype=dtype)
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    torch.manual_seed(0)
    ours = SwiGLUMLP(config, submodules)
    megatron = MLP(config, submodules)
    megatron.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, batch, hidden, generator=gen).to(dtype)
    grad = torch.randn(tokens, batch, hidden, generator=gen).to(dtype)
    our_bytes, our_results = _saved_bytes_and_results(ours, x, grad)
    their_bytes, their_results = _saved_bytes_and_results(megatron, x, grad)
    for got, want in zip(our_results, their_results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # megatron's glu saves b + 0.0, a copy of fc1's up half; ours does not.
    assert their_bytes - our_bytes == tokens * batch * ffn * x.element_size()
    # Anything megatron's plain glu path does not cover goes to megatron's forward.
    config.glu_linear_offset = 1.0
    offset_out, _ = ours(x)
    torch.testing.assert_close(offset_out, megatron(x)[0], rtol=0, atol=0)
    assert not torch.equal(offset_out, our_results[0])
