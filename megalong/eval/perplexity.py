"""Long-context perplexity as LongLoRA's eval defines it (DESIGN.md §9), on the megatron model.

Windows of seq_length tokens start every `stride` tokens: starts 0, stride, 2·stride, ... below
num_tokens − seq_length, without the last one (LongLoRA's get_as_batch drops it; kept so numbers
compare with theirs). Each window is one sequence; its loss is the mean over its seq_length − 1
next-token predictions, and PPL = exp(mean over windows of the window losses). Every window has
the same number of predictions, so that mean is also Σ loss / Σ tokens, which is what the ranks
add up. Attention is dense (the model is built with attention "full", in eval mode) unless the
evaluation asks for a training pattern (config.model.EvalAttention). Each row also keeps every
window's loss, in window order, for intervals over the windows (eval/bootstrap.py).
"""

import time
from typing import Optional

import numpy as np

from megalong import runtime
from megalong.config.model import EvalAttention
from megalong.eval.data import perplexity, repeated_windows, window_starts
from megalong.log import ProgressPrinter
from megalong.model.forward import run_microbatches


def _window_batch(tokens: np.ndarray, starts: list[int], seq_length: int, device,
                  first_scored: int = 0):
    import torch

    windows = torch.from_numpy(np.stack([tokens[s:s + seq_length].astype(np.int64) for s in starts]))
    windows = windows.to(device)
    labels = torch.zeros_like(windows)
    labels[:, :-1] = windows[:, 1:]
    loss_mask = torch.ones(windows.shape, dtype=torch.float32, device=device)
    loss_mask[:, -1] = 0.0  # the window's last token predicts nothing inside it
    loss_mask[:, :first_scored] = 0.0  # the repeat probe scores the second copy only
    return {"tokens": windows, "labels": labels, "loss_mask": loss_mask}


class _Progress:
    """Windows done, running perplexity, tokens/s and ETA on stderr (one reporting rank)."""

    def __init__(self, label: str, total: int, enabled: bool, interval_s: float = 5.0):
        self.label, self.total = label, total
        self.printer = ProgressPrinter(interval_s=interval_s, enabled=enabled)

    def update(self, done: int, tokens: int, mean_loss: float, final: bool = False) -> None:
        def line():
            elapsed = self.printer.elapsed()
            eta = elapsed / max(done, 1) * (self.total - done)
            return (f"[eval_ppl] {self.label}: {done}/{self.total} windows, ppl "
                    f"{perplexity(mean_loss):.4g}, {tokens / elapsed:,.0f} tokens/s, "
                    f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s")

        self.printer.update(line, final=final)


def mean_window_loss(model, tokens: np.ndarray, seq_length: int, starts: list[int], *,
                     micro_batch_size: int = 1, progress: bool = True, first_scored: int = 0):
    """(mean over the windows of each window's mean token loss, predictions counted, each
    window's mean loss in `starts` order) on the model's ranks (any TP/PP; data-parallel ranks
    share the windows). Every rank gets the result. Predictions at positions below
    `first_scored` are not counted."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = [list(range(i, min(i + micro_batch_size, len(starts))))
               for i in range(0, len(starts), micro_batch_size)]  # window indices
    mine = batches[dp_rank::dp_size]
    holds_loss = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                  and parallel_state.get_tensor_model_parallel_rank() == 0)
    meter = _Progress(f"seq-length {seq_length}", sum(len(b) for b in mine),
                      progress and holds_loss and dp_rank == 0)
    # Micro-batches per schedule call: enough to fill a pipeline, few enough to bound memory.
    per_call = 2 * parallel_state.get_pipeline_model_parallel_world_size()
    loss_sum, num_tokens, done = 0.0, 0, 0
    device = runtime.device()
    window_sums = torch.zeros(len(starts), dtype=torch.float64, device=device)
    with torch.no_grad():
        for first in range(0, len(mine), per_call):
            group = mine[first:first + per_call]
            outputs = run_microbatches(
                model, [_window_batch(tokens, [starts[i] for i in b], seq_length, device,
                                      first_scored) for b in group],
                forward_only=True)
            for indices, out in zip(group, outputs):
                loss_sum += float(out["loss_sum"].double())
                num_tokens += int(out["num_tokens"])
                window_sums[indices] = out["sample_loss_sums"].double()
            done += sum(len(b) for b in group)
            meter.update(done, done * seq_length, loss_sum / max(num_tokens, 1))
    meter.update(done, done * seq_length, loss_sum / max(num_tokens, 1), final=True)
    totals = torch.tensor([loss_sum, num_tokens] if holds_loss else [0.0, 0.0],
                          dtype=torch.float64, device=device)
    if not holds_loss:
        window_sums.zero_()
    totals = torch.cat([totals, window_sums])
    dist.all_reduce(totals)  # one TP rank of the last stage per data-parallel rank contributes
    loss_sum, num_tokens = totals[:2].tolist()
    per_window = seq_length - 1 - first_scored
    expected = len(starts) * per_window
    if int(num_tokens) != expected:
        raise RuntimeError(f"counted {int(num_tokens)} predictions, expected {expected}")
    return loss_sum / num_tokens, int(num_tokens), (totals[2:] / per_window).tolist()


def evaluate_perplexity(model, tokens: np.ndarray, seq_lengths, *, stride: int = 256,
                        max_windows: Optional[int] = None, micro_batch_size: int = 1,
                        progress: bool = True, attention: EvalAttention = EvalAttention(),
                        repeat_probe: bool = False) -> list[dict]:
    """One row per seq_length: windows, predictions, mean loss, perplexity, the group size of a
    grouped eval attention (the model was built with `attention`), each window's loss. With
    `repeat_probe` each length gets a second row ("probe": "repeat"): the windows of
    eval.data.repeated_windows, only the second copy scored."""
    rows = []
    for seq_length in seq_lengths:
        kinds = [None, "repeat"] if repeat_probe else [None]
        for probe in kinds:
            if probe:
                stream, starts = repeated_windows(tokens, seq_length, stride, max_windows)
                first_scored = seq_length // 2 - 1  # position N/2 - 1 predicts the copy's first
            else:
                stream, first_scored = tokens, 0
                starts = window_starts(len(tokens), seq_length, stride, max_windows)
            start_time = time.monotonic()
            loss, count, window_losses = mean_window_loss(
                model, stream, seq_length, starts, micro_batch_size=micro_batch_size,
                progress=progress, first_scored=first_scored)
            rows.append({"seq_length": seq_length, "probe": probe, "windows": len(starts),
                         "predictions": count, "loss": loss, "ppl": perplexity(loss),
                         "group_size": attention.group_size_at(seq_length),
                         "seconds": round(time.monotonic() - start_time, 3),
                         "window_losses": [round(x, 6) for x in window_losses]})
    return rows
