"""Save and load megatron-core distributed checkpoints, atomically.

Every rank writes its shards into ROOT/iter_N.tmp; after a barrier rank 0 renames it to
ROOT/iter_N and only then points the tracker file at it, so a crash leaves either the previous
checkpoint or the new one, never a half-written directory that looks complete. The torch_dist
format stores global tensors, so a checkpoint saved at one TP/PP loads at any other.

A training checkpoint also holds the optimizer (sharded like the model), the LR scheduler, the
iteration and every rank's RNG state; a converted HF model holds only the model.
"""

import json
import os
import shutil

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from megalong.checkpoint_meta import METADATA, TRACKER, iteration_dir, latest_iteration
from megalong.errors import MegalongError


def _chunk_keys(model_chunks):
    # Megatron-LM's names: "model", or "model0", "model1", ... with virtual pipeline stages.
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _model_state(model_chunks):
    return {k: m.sharded_state_dict() for k, m in zip(_chunk_keys(model_chunks), model_chunks)}


def _rng_state():
    """This rank's RNG streams as a ShardedObject (one entry per rank in the checkpoint)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),),
                         replica_id=0)


def _set_rng_state(state) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _full_state(model_chunks, optimizer, scheduler, common, is_loading, with_rng=True):
    state = _model_state(model_chunks)
    if optimizer is not None:
        model_state = {k: v for k, v in state.items()}
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state if len(model_chunks) > 1 else model_state["model"], is_loading=is_loading)
        state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        if with_rng:
            state["rng_state"] = _rng_state()
    state["common"] = common or {}
    return state


def save_checkpoint(model_chunks, root: str, iteration: int, metadata: dict, *,
                    optimizer=None, scheduler=None, common=None) -> str:
    final = iteration_dir(root, iteration)
    staging = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    dist_checkpointing.save(_full_state(model_chunks, optimizer, scheduler, common, False), staging)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(staging, METADATA), "w") as handle:
            json.dump({**metadata, "iteration": iteration, "world_size": dist.get_world_size(),
                       "has_training_state": optimizer is not None}, handle, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as handle:
            handle.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return final


def load_checkpoint(model_chunks, root: str, iteration: int | None = None, *, optimizer=None,
                    scheduler=None, allow_missing=lambda key: False):
    """Loads into the built model chunks (and optimizer/scheduler/RNG when given and present).

    `allow_missing(key)` names model keys the checkpoint may lack (LoRA adapters when starting
    from a base model): they keep their initial values. Returns (iteration, common state)."""
    if iteration is None:
        iteration = latest_iteration(root)
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise MegalongError(f"checkpoint {directory} does not exist")
    with open(os.path.join(directory, METADATA)) as handle:
        saved = json.load(handle)
    from megalong.lora.apply import is_adapter_param

    if saved.get("lora") and not any(is_adapter_param(name) for m in model_chunks
                                     for name, _ in m.named_parameters()):
        raise MegalongError(f"checkpoint {directory} holds LoRA adapters but the model has none: "
                            "build it with megalong.model.from_checkpoint, or export with --merge-lora")
    load_training = optimizer is not None and saved.get("has_training_state", False)
    # RNG streams are per rank: they carry over only to the same number of ranks.
    same_ranks = saved.get("world_size") == dist.get_world_size()
    request = _full_state(model_chunks, optimizer if load_training else None,
                          scheduler, None, is_loading=True, with_rng=same_ranks)
    try:
        # "unexpected" = requested but absent from the checkpoint (returned, not raised).
        state, _, absent = dist_checkpointing.load(request, directory,
                                                   strict=StrictHandling.RETURN_UNEXPECTED)
    except Exception as err:  # megatron raises many types; name the directory
        raise MegalongError(f"cannot load checkpoint {directory}: {err}") from err
    not_allowed = sorted(k for k in absent if not allow_missing(k))
    if not_allowed:
        raise MegalongError(f"checkpoint {directory} lacks {', '.join(not_allowed[:5])} "
                            f"({len(not_allowed)} tensors): it was written for another model")
    for key, model in zip(_chunk_keys(model_chunks), model_chunks):
        missing, unexpected = model.load_state_dict(state[key], strict=False)
        bad = [k for k in missing if not k.endswith("_extra_state") and not allow_missing(k)]
        if bad or unexpected:
            raise MegalongError(f"checkpoint {directory} does not fit the model: missing "
                                f"{bad[:5]}, unexpected {list(unexpected)[:5]}")
    if load_training:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if same_ranks:
            _set_rng_state(state["rng_state"])
    return iteration, (state.get("common") or {}) if load_training else {}


def model_parallel_description() -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
    }
