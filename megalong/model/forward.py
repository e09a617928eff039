"""Forward (and backward) over micro-batches through megatron-core's schedules, so the same call
works at any TP/PP. Per-token loss: the loss is a sum over tokens with its token count."""

from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megalong import runtime
from megalong.model.cp_layout import gather_sequence_over_cp, slice_batch_for_cp_rank


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _loss_sum(loss_mask, per_token_loss):
    loss_mask = loss_mask.to(per_token_loss.dtype)
    sample_sums = (per_token_loss * loss_mask).sum(dim=-1)  # [b]: evaluations report each window
    loss_sum = sample_sums.sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens,
                                  "sample_loss_sums": sample_sums.detach()}


def _gathered_logits(logits):
    # [b, s/cp, V/tp] -> [b, s, V]; the second value is what the schedule would back-propagate.
    full = gather_sequence_over_cp(gather_from_tensor_model_parallel_region(logits), dim=1)
    return logits.sum() * 0.0, {"logits": full.detach()}


def _on_device(batch: dict) -> dict:
    """Datasets yield CPU tensors; the model may live on a GPU."""
    device = runtime.device()
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def _forward_step(mode, data_iterator, model):
    batch = _on_device(next(data_iterator))
    if batch.get("position_ids") is None:
        batch = {**batch, "position_ids": position_ids_for(batch["tokens"])}
    # Context parallel: this rank's contiguous slice of every per-token field (labels were
    # shifted over the whole sequence already).
    batch = slice_batch_for_cp_rank(batch)
    tokens, position_ids = batch["tokens"], batch["position_ids"]
    if mode == "logits":
        return model(tokens, position_ids, None), _gathered_logits
    output = model(tokens, position_ids, None, labels=batch["labels"])
    return output, partial(_loss_sum, batch["loss_mask"])


def run_microbatches(model_chunks, microbatches, *, forward_only: bool, mode: str = "loss"):
    """microbatches: list of dicts with tokens [b, s] (+ labels, loss_mask for mode "loss"),
    whole sequences: under context parallel each rank takes its slice. Returns the
    per-micro-batch outputs on the last pipeline stage ([] elsewhere)."""
    if not isinstance(model_chunks, list):
        model_chunks = [model_chunks]
    tokens = microbatches[0]["tokens"]
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=partial(_forward_step, mode),
        data_iterator=iter(microbatches),
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )

