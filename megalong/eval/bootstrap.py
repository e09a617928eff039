"""Bootstrap intervals over evaluation windows (torch-free): how much of a perplexity gap is the
choice of windows. A perplexity report's rows keep each window's loss (eval/perplexity.py);
resampling the windows with replacement gives a percentile interval for one model's perplexity,
and resampling the *same* windows for two models gives one for their difference (paired: both
saw the same text, so the text's own difficulty cancels).

Windows that overlap share tokens and are not independent, so intervals over strongly
overlapping windows are too narrow; evaluations meant for intervals should space their windows
at least a window apart (eval_ppl --max-windows spreads them evenly over the data).
"""

import math
from typing import Sequence

import numpy as np


def _resampled_means(losses: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """[samples, models] means over windows drawn with replacement (the same draws for every
    model: losses is [windows, models])."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, losses.shape[0], size=(samples, losses.shape[0]))
    return losses[picks].mean(axis=1)


def _check(losses: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(losses, dtype=np.float64)
    if array.ndim != 1 or len(array) < 2:
        raise ValueError(f"{name}: need at least 2 window losses, got {len(array)}")
    return array


def ppl_interval(window_losses: Sequence[float], *, level: float = 0.95, samples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of exp(mean window loss)."""
    losses = _check(window_losses, "window_losses")[:, None]
    means = _resampled_means(losses, samples, seed)[:, 0]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return math.exp(low), math.exp(high)


def paired_ppl_difference(losses_a: Sequence[float], losses_b: Sequence[float], *,
                          level: float = 0.95, samples: int = 2000,
                          seed: int = 0) -> tuple[float, float, float]:
    """(ppl_a - ppl_b, interval low, high) for two models evaluated on the same windows."""
    a, b = _check(losses_a, "losses_a"), _check(losses_b, "losses_b")
    if len(a) != len(b):
        raise ValueError(f"paired windows differ in number: {len(a)} and {len(b)}")
    means = _resampled_means(np.stack([a, b], axis=1), samples, seed)
    differences = np.exp(means[:, 0]) - np.exp(means[:, 1])
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return math.exp(a.mean()) - math.exp(b.mean()), float(low), float(high)
