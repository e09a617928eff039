"""Save and load megatron-core distributed checkpoints, atomically.

Every rank writes its shards into ROOT/iter_N.tmp; after a barrier rank 0 renames it to
ROOT/iter_N and only then points the tracker file at it, so a crash leaves either the previous
checkpoint or the new one, never a half-written directory that looks complete. The torch_dist
format stores global tensors, so a checkpoint saved at one TP/PP loads at any other.
"""

import json
import os
import shutil

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megalong.checkpoint_meta import METADATA, TRACKER, iteration_dir, latest_iteration
from megalong.errors import MegalongError


def _chunk_keys(model_chunks):
    # Megatron-LM's names: "model", or "model0", "model1", ... with virtual pipeline stages.
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _sharded_state_dict(model_chunks):
    return {k: m.sharded_state_dict() for k, m in zip(_chunk_keys(model_chunks), model_chunks)}


def save_checkpoint(model_chunks, root: str, iteration: int, metadata: dict) -> str:
    final = iteration_dir(root, iteration)
    staging = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(model_chunks), staging)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(staging, METADATA), "w") as handle:
            json.dump({**metadata, "iteration": iteration}, handle, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as handle:
            handle.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return final


def load_checkpoint(model_chunks, root: str, iteration: int | None = None) -> int:
    """Loads weights into the (already built) model chunks; returns the iteration loaded."""
    if iteration is None:
        iteration = latest_iteration(root)
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise MegalongError(f"checkpoint {directory} does not exist")
    sharded = _sharded_state_dict(model_chunks)
    try:
        state = dist_checkpointing.load(sharded, directory)
    except Exception as err:  # megatron raises many types; name the directory
        raise MegalongError(f"cannot load checkpoint {directory}: {err}") from err
    for key, model in zip(_chunk_keys(model_chunks), model_chunks):
        model.load_state_dict(state[key], strict=True)
    return iteration
