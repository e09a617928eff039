"""Test helper: a model's whole logits, gathered over TP (the package never needs them whole:
training and evaluation go through chunked losses)."""

import torch
from megatron.core import parallel_state

from megalong.model.forward import run_microbatches


def full_logits(model, tokens: torch.Tensor):
    """Logits [b, s, vocab] gathered over TP on the last pipeline stage, else None."""
    with torch.no_grad():
        outputs = run_microbatches(model, [{"tokens": tokens}], forward_only=True, mode="logits")
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs[0]["logits"]
