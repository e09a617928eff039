"""Attention kept through full recompute (--recompute-keep-attention).

Full recompute runs each layer's forward twice: once without a graph (megatron's checkpoint
keeps only the layer's input) and again in the backward. The second run of the attention
kernel is the costly part at long context. With this on, the first run builds attention's own
small graph on detached q, k, v (the kernel saves its output and softmax statistics as usual)
and keeps it; the recompute then reuses that output and back-propagates through the kept graph,
so the kernel's forward runs once. Kernel-agnostic: it relies only on the kernel's autograd.

The recompute is matched to its kept entry by the inputs themselves: q, k, v equal, or equal up
to rounding. A recompute can round differently from its forward (seen on CPU: a few elements
of the first layer's qkv output 1 ulp apart), and the kept values are the forward's own, so
reusing them is then as faithful as no recompute at all. An entry that no backward will claim
(a no-grad forward in training mode) differs by the size of the values themselves: it is
dropped, and the attention simply runs again (train_step warns once).
"""

from collections import deque

import torch

# Largest difference, relative to the largest kept value, that still counts as rounding: a few
# ulps even in bf16 (2^-8), far below the difference between two micro-batches' inputs.
ROUNDING = 2.0 ** -5
_ROWS = 1024  # rows (tokens) compared at a time, so that no input-sized temporary is made


def same_inputs(kept, now) -> bool:
    """Whether q, k, v are the kept ones, equal or equal up to rounding."""
    for a, b in zip(kept, now):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if torch.equal(a, b):
            continue
        rows = [(a[i:i + _ROWS], b[i:i + _ROWS]) for i in range(0, a.shape[0], _ROWS)]
        largest = max(x.abs().amax() for x, _ in rows)
        if not max((x - y).abs().amax() for x, y in rows) <= ROUNDING * largest:
            return False
    return True


class _ReuseKeptOutput(torch.autograd.Function):
    """Returns the kept output; its backward runs the kept graph into q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, entry):
        ctx.entry = entry
        return entry[1].detach()

    @staticmethod
    def backward(ctx, grad):
        inputs, output = ctx.entry
        ctx.entry = None  # free the kept graph with this backward
        grads = torch.autograd.grad(output, inputs, grad, allow_unused=True)
        return (*grads, None)


class KeptAttentionOutputs:
    """One core-attention module's kept (inputs, output) pairs, oldest first: a pipeline
    schedule may run several micro-batches' forwards before their backwards, in order."""

    def __init__(self):
        self._entries = deque()
        self.dropped = 0  # entries no recompute matched (tests and diagnostics)

    def __len__(self):
        return len(self._entries)

    def __call__(self, attend, q, k, v):
        """attend(q, k, v) -> output, through the kept graph where one applies."""
        if not torch.is_grad_enabled():  # a checkpoint's first forward
            inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
            with torch.enable_grad():
                output = attend(*inputs)
            self._entries.append((inputs, output))
            return output.detach()
        while self._entries:  # the recompute (or a layer that is not checkpointed)
            entry = self._entries.popleft()
            if same_inputs(entry[0], (q, k, v)):
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
