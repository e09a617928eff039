"""Numeric faults: a non-finite loss or gradient norm skips the optimizer step (weights, Adam
moments and the LR schedule stay as they were) instead of poisoning the run."""

import math


def guarded_step(optimizer, loss: float):
    """megatron's optimizer.step(), unless the loss or the gradient norm is non-finite.
    `loss` is identical on every rank and megatron all-reduces the norm, so all ranks decide
    alike. prepare_grads() only copies gradients, so step() may repeat it. Returns
    (updated, grad_norm)."""
    if not math.isfinite(loss):
        return False, None
    if optimizer.prepare_grads():  # megatron's own overflow flag (fp16 loss scaling)
        return False, None
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return False, grad_norm
    updated, grad_norm, _ = optimizer.step()
    return updated, grad_norm
