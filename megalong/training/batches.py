"""Which samples each rank trains on: a pure function of the iteration, so a resumed run sees
exactly the batches an uninterrupted one would, whatever the data-parallel layout."""

import torch

from megalong.errors import MegalongError


def rank_sample_indices(iteration: int, global_batch_size: int, num_samples: int,
                        dp_rank: int, dp_size: int) -> list[int]:
    """Dataset indices of this data-parallel rank's share of global batch `iteration`:
    the global batch is consecutive samples, cut into dp_size contiguous slices."""
    per_rank = global_batch_size // dp_size
    first = iteration * global_batch_size + dp_rank * per_rank
    return [(first + i) % num_samples for i in range(per_rank)]


def collate(samples) -> dict:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in ("tokens", "labels", "loss_mask")}


def microbatches(dataset, iteration: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, vocab_size: int) -> list[dict]:
    indices = rank_sample_indices(iteration, global_batch_size, len(dataset), dp_rank, dp_size)
    collate_fn = getattr(dataset, "collate", collate)  # SFT pads to the longest sample
    batches = [collate_fn([dataset[i] for i in indices[start:start + micro_batch_size]])
               for start in range(0, len(indices), micro_batch_size)]
    largest = max(int(batch["tokens"].max()) for batch in batches)
    if largest >= vocab_size:
        raise MegalongError(
            f"the data holds token id {largest} but the model's vocabulary has {vocab_size} "
            "tokens: it was tokenized with another tokenizer (re-run tools/preprocess_data.py "
            "with the model's tokenizer)")
    return batches
