"""RMSNorm that works under sequence parallel (megatron's WrappedTorchNorm refuses SP)."""

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megalong import runtime


class RMSNorm(MegatronModule):
    """Llama's RMSNorm, computed in float32 as HF does. Under sequence parallel each rank sees
    different tokens, so the weight's gradient is partial: the `sequence_parallel` tag makes
    megatron's finalize_model_grads all-reduce it over TP."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_param_device(config))
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.is_cuda:
            # torch's fused kernel (float32 statistics, one pass each way) instead of ~8
            # elementwise passes; it rounds to the input dtype once, after the weight multiply.
            return F.rms_norm(hidden, (hidden.shape[-1],), self.weight.to(hidden.dtype), self.eps)
        input_dtype = hidden.dtype
        hidden32 = hidden.float()
        hidden32 = hidden32 * torch.rsqrt(hidden32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden32.to(input_dtype)


def _param_device(config: TransformerConfig):
    return "cpu" if config.use_cpu_initialization or not runtime.use_cuda() else "cuda"
