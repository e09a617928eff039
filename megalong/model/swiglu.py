"""SwiGLU as one autograd Function, and megatron's MLP running it where megatron would run its
unfused glu (CPU: megalong enables megatron's fused SwiGLU on GPUs only).

megatron's unfused glu is `silu(a) * (b + glu_linear_offset)`: the offset add copies b even at
0.0, and the multiply saves that copy for its backward, so each layer kept a fourth ffn-wide
tensor. The Function saves fc1's output and silu(a) only (what the backward needs), and
writes both halves of the input gradient in place, with no concatenation.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class SwiGLU(torch.autograd.Function):
    """x [..., 2f] (gate half, then up half) -> silu(gate) * up [..., f]."""

    @staticmethod
    def forward(ctx, x):
        gate, up = torch.chunk(x, 2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(x, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad):
        x, activated = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = torch.chunk(grad_x, 2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    return SwiGLU.apply(x)


class SwiGLUMLP(MLP):
    """megatron's MLP (its linears, initialisation and sharded state dict) whose forward runs
    `swiglu` whenever megatron would take its plain-torch gated path; anything else (fused
    SwiGLU, TE activations, clamping, an offset, per-token scales) goes to megatron's forward."""

    def _runs_plain_swiglu(self) -> bool:
        c = self.config
        return (c.gated_linear_unit and c.activation_func is F.silu
                and not c.bias_activation_fusion and not c.use_te_activation_func
                and c.activation_func_clamp_value is None and not c.glu_linear_offset)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None or not self._runs_plain_swiglu():
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))
