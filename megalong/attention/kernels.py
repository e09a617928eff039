"""Inner attention calls for S²-Attn, chosen by name: auto | sdpa | torch-varlen | flex | flash |
te.

Every kernel attends causally within independent groups; the folding into groups is shared
(groups.py) and only the call here differs. Three layouts:
- "groups": q [B, L, H, d], k/v [B, L, H_kv, d], one group per batch entry (sdpa, te);
- "varlen": q [T, H, d], k/v [T, H_kv, d] with int32 cu_seqlens group boundaries (torch-varlen,
  flash); separate key boundaries where segments have fewer queries than keys, causal aligned
  bottom-right as FlashAttention-2 aligns it (the context-parallel straddling group);
- "whole": the unfolded [N, b, H, d] tensors and the group size, one masked call (flex, flex.py).
flash-attn and Transformer Engine are optional GPU packages, imported on first use; torch-varlen
and flex are torch's own (torch >= 2.10 and 2.5), GPU kernels too.
"""

import inspect
import math
from typing import Dict

import torch
import torch.nn.functional as F

from megalong.attention.flex import FlexKernel
from megalong.errors import MegalongError


KERNELS = ("auto", "sdpa", "torch-varlen", "flex", "flash", "te")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Kernels that take fp16/bf16 only.
HALF_ONLY = ("torch-varlen", "flash")


class KernelUnavailableError(MegalongError, ValueError):
    """An attention kernel was asked for that this machine or install cannot run."""


class SDPAKernel:
    """torch.nn.functional.scaled_dot_product_attention; CPU and GPU, any float dtype."""

    name, layout, supports_gqa = "sdpa", "groups", True

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)


class FlashKernel:
    """flash_attn_varlen_func, one call per half of the heads (GPU, fp16/bf16)."""

    name, layout, supports_gqa = "flash", "varlen", True

    def __init__(self):
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func

    def attend_varlen(self, q, k, v, cu_seqlens, max_seqlen: int, scale: float,
                      cu_seqlens_k=None, max_seqlen_k=None) -> torch.Tensor:
        cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        max_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
        return self._varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k,
                            dropout_p=0.0, softmax_scale=scale, causal=True)


class TorchVarlenKernel:
    """torch.nn.attention.varlen.varlen_attn: FlashAttention-2 with cu_seqlens and a backward,
    in torch since 2.10 (CUDA, fp16/bf16). Its signature changed between releases (2.10: an
    `is_causal` flag; later: keyword-only `scale`, `window_size`, `enable_gqa`), so what it can
    do is read from its parameters, never from torch's version: causal as window_size (-1, 0)
    or is_causal, the scale passed or folded into q, GQA through enable_gqa or K/V expanded by
    the caller (supports_gqa False)."""

    name, layout = "torch-varlen", "varlen"

    def __init__(self, varlen_attn=None):
        if varlen_attn is None:
            from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
        if "window_size" in params:
            self._causal = {"window_size": (-1, 0)}
        elif "is_causal" in params:
            self._causal = {"is_causal": True}
        else:
            raise ImportError("torch's varlen_attn has neither window_size nor is_causal: "
                              f"unknown signature {inspect.signature(varlen_attn)}")
        self._varlen = varlen_attn
        self._takes_scale = "scale" in params
        self.supports_gqa = "enable_gqa" in params

    def attend_varlen(self, q, k, v, cu_seqlens, max_seqlen: int, scale: float,
                      cu_seqlens_k=None, max_seqlen_k=None) -> torch.Tensor:
        kwargs = dict(self._causal)
        if self._takes_scale:
            kwargs["scale"] = scale
        elif not math.isclose(scale * math.sqrt(q.shape[-1]), 1.0):
            q = q * (scale * math.sqrt(q.shape[-1]))  # the kernel's own scale is 1/sqrt(d)
        if k.shape[1] != q.shape[1]:
            kwargs["enable_gqa"] = True
        cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        max_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
        return self._varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, **kwargs)


def _flex_kernel():
    return FlexKernel()


class TEKernel:
    """transformer_engine DotProductAttention on the folded batch, "bshd" layout, local head
    counts, tp_size=1 and no context-parallel group (GPU)."""

    name, layout, supports_gqa = "te", "groups", True

    def __init__(self):
        import transformer_engine.pytorch as te

        self._te = te
        self._modules: Dict[tuple, torch.nn.Module] = {}

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        batch, length, heads, dim = q.shape
        key = (heads, k.shape[2], dim, scale)
        if key not in self._modules:
            self._modules[key] = self._te.DotProductAttention(
                num_attention_heads=heads, kv_channels=dim, num_gqa_groups=k.shape[2],
                attention_dropout=0.0, qkv_format="bshd", attn_mask_type="causal",
                softmax_scale=scale, tp_size=1, tp_group=None,
            )
        out = self._modules[key](q.contiguous(), k.contiguous(), v.contiguous())
        return out.view(batch, length, heads, dim)


_FACTORIES = {"sdpa": SDPAKernel, "torch-varlen": TorchVarlenKernel, "flex": _flex_kernel,
              "flash": FlashKernel, "te": TEKernel}
_INSTALL_HINT = {
    "torch-varlen": "torch >= 2.10 (torch.nn.attention.varlen; CUDA only)",
    "flex": "torch >= 2.5 with FlexAttention (torch.nn.attention.flex_attention; CUDA for "
            "training)",
    "flash": "the flash-attn package (pip install flash-attn; CUDA only)",
    "te": "Transformer Engine (pip install 'transformer-engine[pytorch]'; CUDA only)",
}
# A package that is installed but cannot load (missing CUDA libraries, an ABI mismatch) raises
# these, not only ImportError.
PACKAGE_LOAD_ERRORS = (ImportError, OSError, RuntimeError)
_instances: Dict[str, object] = {}
_import_errors: Dict[str, Exception] = {}


def _load(name: str):
    if name not in _instances and name not in _import_errors:
        try:
            _instances[name] = _FACTORIES[name]()
        except PACKAGE_LOAD_ERRORS as err:
            _import_errors[name] = err
    return _instances.get(name)


def available_kernels() -> list:
    """Names of the kernels whose packages import here (sdpa always)."""
    return [name for name in _FACTORIES if _load(name) is not None]


def resolve_kernel(name: str, device: torch.device, dtype: torch.dtype):
    """The kernel object for `name`; `auto` picks flash > te > sdpa (flash and te only for
    fp16/bf16 CUDA tensors). An explicit request that cannot run raises KernelUnavailableError."""
    if name not in KERNELS:
        raise KernelUnavailableError(
            f"unknown attention kernel {name!r}; choose one of {', '.join(KERNELS)}"
        )
    on_gpu = torch.device(device).type == "cuda"
    if name == "auto":
        if on_gpu and dtype in _HALF_DTYPES:
            for candidate in ("flash", "te"):
                if _load(candidate) is not None:
                    return _instances[candidate]
        return _load("sdpa")
    if name != "sdpa":
        if _load(name) is None:
            raise KernelUnavailableError(
                f"attention kernel {name!r} needs {_INSTALL_HINT[name]}; import failed: "
                f"{_import_errors[name]}. Use kernel 'sdpa' or 'auto' instead"
            )
        if not on_gpu:
            raise KernelUnavailableError(
                f"attention kernel {name!r} runs on CUDA tensors only (got {device}); "
                "use kernel 'sdpa' or 'auto'"
            )
        if name in HALF_ONLY and dtype not in _HALF_DTYPES:
            raise KernelUnavailableError(
                f"attention kernel {name!r} takes fp16/bf16 only (got {dtype}); train with "
                "--bf16 or use kernel 'sdpa' or 'auto'"
            )
    return _load(name)
