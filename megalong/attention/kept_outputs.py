"""Attention kept through full recompute (--recompute-keep-attention).

Full recompute runs each layer's forward twice: once without a graph (megatron's checkpoint
keeps only the layer's input) and again in the backward. The second run of the attention
kernel is the costly part at long context. With this on, the first run builds attention's own
small graph and keeps it (the kernel saves its output and softmax statistics as usual); the
recompute then reuses that output and back-propagates through the kept graph, so the kernel's
forward runs once. Kernel-agnostic: it relies only on the kernel's autograd.

The kept graph starts at gradient edges, not at q, k, v themselves, so an entry holds only what
the kernel saves: a kernel that copies its inputs (GPU SDPA, Transformer Engine) lets the layer's
q, k, v and qkv output go, while one that saves views of them (CPU SDPA) keeps them anyway.

The recompute is matched to its kept entry by fingerprints of its inputs: equal, or equal up to
rounding. A recompute can round differently from its forward (seen on CPU: a few elements of the
first layer's qkv output 1 ulp apart), and the kept values are the forward's own, so reusing
them is then as faithful as no recompute at all. An entry that no backward will claim (a no-grad
forward in training mode) differs by the size of the values themselves: it is dropped, and the
attention simply runs again (train_step warns once).
"""

from collections import deque
from typing import Dict, Tuple

import torch
from torch.autograd.graph import get_gradient_edge

# Largest difference, relative to the largest fingerprint, that still counts as rounding: a few
# ulps even in bf16 (2^-8), far below the difference between two micro-batches' inputs.
ROUNDING = 2.0 ** -5
_PROBES = 4  # projections per token: a fingerprint is 16 bytes per token and tensor
_probe_cache: Dict[Tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _probes(width: int, device, dtype) -> torch.Tensor:
    """A fixed random [width, _PROBES] matrix: a difference in any head and channel shows.
    Cached per device and dtype, so the hot path casts nothing."""
    key = (width, torch.device(device), dtype)
    if key not in _probe_cache:
        gen = torch.Generator().manual_seed(width)
        _probe_cache[key] = torch.randn(width, _PROBES, generator=gen).to(device, dtype)
    return _probe_cache[key]


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] -> float32 [s, b, _PROBES]: each token's heads projected on fixed probes,
    in t's dtype (one small GEMM, no float32 copy of t; rounding of a bf16 result is far below
    ROUNDING)."""
    probes = _probes(t.shape[-2] * t.shape[-1], t.device, t.dtype)
    return (t.flatten(-2) @ probes).float()


def same_inputs(kept, now) -> bool:
    """Whether the fingerprints `now` are the `kept` ones, equal or equal up to rounding.
    Synchronises with the device by design (once per recomputed layer): the answer decides, on
    the host, which graph the backward runs."""
    if any(a.shape != b.shape for a, b in zip(kept, now)):
        return False
    close = [(a - b).abs().amax() <= ROUNDING * a.abs().amax() for a, b in zip(kept, now)]
    return bool(torch.stack(close).all())  # one host sync for the three


class _GraphRoots(torch.autograd.Function):
    """q, k, v as the roots of a kept graph without holding them: the graph's input edges point
    at this node, which saves nothing. (A detached leaf would not do: its AccumulateGrad node,
    which the graph holds, keeps the tensor alive.)"""

    @staticmethod
    def forward(ctx, anchor, *tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) * (1 + len(grads))


class _ReuseKeptOutput(torch.autograd.Function):
    """Returns the kept output; its backward runs the kept graph into q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, entry):
        ctx.entry = entry
        return entry["output"].detach()

    @staticmethod
    def backward(ctx, grad):
        entry, ctx.entry = ctx.entry, None  # free the kept graph with this backward
        grads = torch.autograd.grad(entry["output"], entry["edges"], grad, allow_unused=True)
        return (*grads, None)


class KeptAttentionOutputs:
    """One core-attention module's kept entries (fingerprints, graph input edges, output),
    oldest first: a pipeline schedule may run several micro-batches' forwards before their
    backwards, in order."""

    def __init__(self):
        self._entries = deque()
        self._anchor = None  # the one leaf the kept graphs hang from (it holds no data)
        self.dropped = 0  # entries no recompute matched (tests and diagnostics)

    def __len__(self):
        return len(self._entries)

    def __call__(self, attend, q, k, v):
        """attend(q, k, v) -> output, through the kept graph where one applies."""
        if not torch.is_grad_enabled():  # a checkpoint's first forward
            if self._anchor is None or self._anchor.device != q.device:
                self._anchor = torch.empty(0, device=q.device, requires_grad=True)
            with torch.enable_grad():
                roots = _GraphRoots.apply(self._anchor, q, k, v)
                output = attend(*roots)
            self._entries.append({"fingerprints": [fingerprint(t) for t in (q, k, v)],
                                  "edges": [get_gradient_edge(t) for t in roots],
                                  "output": output})
            return output.detach()
        if self._entries:  # the recompute (or a layer that is not checkpointed)
            now = [fingerprint(t) for t in (q, k, v)]
            while self._entries:
                entry = self._entries.popleft()
                if same_inputs(entry["fingerprints"], now):
                    return _ReuseKeptOutput.apply(q, k, v, entry)
                self.dropped += 1
        return attend(q, k, v)

    def clear(self):
        self._entries.clear()


def clear_kept_attention(models) -> int:
    """Drop every kept entry (called before each training step, so that nothing a previous step
    left unclaimed stays in memory). Returns how many entries recomputes have dropped since the
    last call, and resets that count."""
    dropped = 0
    for model in models:
        for module in model.modules():
            kept = getattr(module, "kept_outputs", None)
            if isinstance(kept, KeptAttentionOutputs):
                kept.clear()
                dropped, kept.dropped = dropped + kept.dropped, 0
    return dropped
