"""Save and load megatron-core distributed checkpoints, atomically.

Every rank writes its shards into ROOT/iter_N.tmp; after a barrier the ranks checksum the files
and rank 0 writes ROOT/iter_N.tmp/manifest.json (size + CRC-32 of each file, see
checkpoint_manifest.py), renames the directory to ROOT/iter_N and only then points the tracker
file at it, so a crash leaves either the previous checkpoint or the new one, never a half-written
directory that looks complete. Older iterations are kept; loading checks the files against the
manifest and names a damaged one (or falls back to an older iteration when asked). The torch_dist
format stores global tensors, so a checkpoint saved at one TP/PP loads at any other.

A training checkpoint also holds the optimizer (sharded like the model), the LR scheduler, the
iteration and every rank's RNG state; a converted HF model holds only the model.
"""

import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megalong import faults, runtime
from megalong.atomic import atomic_file, move_into_place
from megalong.checkpoint_manifest import (candidate_iterations, check_checkpoint, damaged_message,
                                          file_entries, list_files, write_manifest)
from megalong.config.checkpoint import (METADATA, TRACKER, CheckpointMetadata, iteration_dir,
                                        read_metadata)
from megalong.errors import MegalongError
from megalong.log import log
from megalong.lora.apply import is_adapter_param


def _chunk_keys(model_chunks):
    # Megatron-LM's names: "model", or "model0", "model1", ... with virtual pipeline stages.
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _model_state(model_chunks):
    return {k: m.sharded_state_dict() for k, m in zip(_chunk_keys(model_chunks), model_chunks)}


def _rng_state():
    """This rank's RNG streams as a ShardedObject (one entry per rank in the checkpoint). The
    device type is recorded: the tracker's (and "cuda"'s) states are CUDA generator states on
    GPUs and CPU generator states on CPU, and neither kind restores into the other."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
             "device": runtime.device_type()}
    if runtime.use_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),),
                         replica_id=0)


def _saved_rng_device(state) -> str:
    """The device type the state was saved on. Checkpoints from before it was recorded: a CPU
    tracker state is a whole CPU generator state, a CUDA one is a few bytes."""
    if "device" in state:
        return state["device"]
    tracked = list(state.get("tracker", {}).values())
    cpu_size = torch.get_rng_state().numel()
    return "cpu" if not tracked or tracked[0].numel() == cpu_size else "cuda"


def _set_rng_state(state) -> None:
    """Restores the RNG streams saved by `_rng_state`; the device-specific ones only on the
    device type they were saved on (else they are skipped with a warning: the run continues
    with freshly seeded streams, as after a change of world size)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    saved, here = _saved_rng_device(state), runtime.device_type()
    if saved != here:
        warnings.warn(f"the checkpoint's RNG state was saved on {saved} and this run is on "
                      f"{here}: its {saved} generator states are not restored (dropout masks "
                      "and other random draws differ from an uninterrupted run)", stacklevel=2)
        return
    if "cuda" in state and here == "cuda":
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


def save_checkpoint(model_chunks, root: str, iteration: int, metadata: CheckpointMetadata, *,
                    optimizer=None, scheduler=None, common=None) -> str:
    final = iteration_dir(root, iteration)
    staging = final + ".tmp"
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    try:
        dist_checkpointing.save(_full_state(model_chunks, optimizer, scheduler, common, False),
                                staging)
    except (Exception, CheckpointException) as err:  # e.g. a full disk; the old checkpoints stay
        raise MegalongError(f"cannot save checkpoint {staging}: {_one_line(err)}") from err
    if rank == 0:
        written = metadata.replace(iteration=iteration, world_size=world,
                                   has_training_state=optimizer is not None)
        _write_durably(os.path.join(staging, METADATA), json.dumps(written.to_json(), indent=2))
    dist.barrier()  # every file of the checkpoint is written
    # The manifest (size + CRC-32 of every file) is written last: the ranks split the reading,
    # rank 0 lists the files (one listing, whatever a shared file system shows each node).
    names = [list_files(staging) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    names = names[0]
    faults.checkpoint_writes_done(len(names), iteration)
    shares = [None] * world
    dist.all_gather_object(shares, file_entries(staging, names[rank::world]))
    if rank == 0:
        write_manifest(staging, {name: entry for share in shares for name, entry in share.items()})
        faults.checkpoint_writes_done(len(names) + 1, iteration)
        move_into_place(staging, final)  # a leftover iter_N (not named by the tracker) is replaced
        _fsync_dir(root)
        faults.checkpoint_writes_done(len(names) + 2, iteration)
        with atomic_file(os.path.join(root, TRACKER)) as tracker_tmp:
            _write_durably(tracker_tmp, str(iteration))
        _fsync_dir(root)
    dist.barrier()
    return final


def _write_durably(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: str) -> None:
    """Makes a rename in `path` durable (a power loss after it keeps it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def verified_iteration(root: str, start: int | None = None, *, fallback: bool = False) -> int:
    """Collective: the iteration to load (`start`, else the tracker's) after checking its files
    against the manifest (sizes and CRC-32; the ranks split the reading). A damaged checkpoint
    is an error naming the file, unless `fallback`: then the newest intact older one is used."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # Rank 0 lists the candidates for everyone (one view of a shared file system, one decision).
    listing = [None]
    if rank == 0:
        try:
            listing = [candidate_iterations(root, fallback=fallback, start=start)]
        except MegalongError as err:
            listing = [str(err)]
    dist.broadcast_object_list(listing, src=0)
    if isinstance(listing[0], str):
        raise MegalongError(listing[0])
    candidates = listing[0]
    for iteration in candidates:
        mine = check_checkpoint(iteration_dir(root, iteration), deep=True, share=(rank, world))
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        problems = sorted({problem for share in gathered for problem in share})
        if not problems:
            return iteration
        if not fallback:
            raise MegalongError(damaged_message(root, iteration, problems))
        if rank == 0:
            log(f"{damaged_message(root, iteration, problems, hint=False)}; "
                "--load-fallback: trying an older checkpoint", every_rank=True)
    raise MegalongError(f"no intact checkpoint in {root}: iterations "
                        f"{', '.join(map(str, candidates))} are all damaged")


def load_checkpoint(model_chunks, root: str, iteration: int | None = None, *, optimizer=None,
                    scheduler=None, allow_missing=lambda key: False, fallback: bool = False):
    """Loads into the built model chunks (and optimizer/scheduler/RNG when given and present).

    `allow_missing(key)` names model keys the checkpoint may lack (LoRA adapters when starting
    from a base model): they keep their initial values. The files are checked against the
    manifest first (`verified_iteration`; `fallback`: --load-fallback). Returns (iteration,
    common state)."""
    iteration = verified_iteration(root, iteration, fallback=fallback)
    directory = iteration_dir(root, iteration)
    saved = read_metadata(root, iteration)

    if saved.lora and not any(is_adapter_param(name) for m in model_chunks
                                     for name, _ in m.named_parameters()):
        raise MegalongError(f"checkpoint {directory} holds LoRA adapters but the model has none: "
                            "load it with megalong.build.load_model, or export with --merge-lora")
    load_training = optimizer is not None and saved.has_training_state
    # RNG streams are per rank: they carry over only to the same number of ranks.
    same_ranks = saved.world_size == dist.get_world_size()
    request = _full_state(model_chunks, optimizer if load_training else None,
                          scheduler, None, is_loading=True, with_rng=same_ranks)
    try:
        # "unexpected" = requested but absent from the checkpoint (returned, not raised).
        state, _, absent = dist_checkpointing.load(request, directory,
                                                   strict=StrictHandling.RETURN_UNEXPECTED)
    except (Exception, CheckpointException) as err:  # many types (torch's is a BaseException)
        raise MegalongError(f"cannot load checkpoint {directory}: {_one_line(err)}") from err
    # `_extra_state` entries hold module metadata, not weights: TE's FP8 scaling state, empty
    # ones from megatron's local linears, none from other writers. Absent, a module keeps its
    # initial state; present but not asked for, they are dropped. So local-spec and TE-spec
    # checkpoints load into each other.
    not_allowed = sorted(k for k in absent if not _is_extra_state(k) and not allow_missing(k))
    if not_allowed:
        raise MegalongError(f"checkpoint {directory} lacks {', '.join(not_allowed[:5])} "
                            f"({len(not_allowed)} tensors): it was written for another model")
    for key, model in zip(_chunk_keys(model_chunks), model_chunks):
        missing, unexpected = model.load_state_dict(state[key], strict=False)
        bad = [k for k in missing if not _is_extra_state(k) and not allow_missing(k)]
        unexpected = [k for k in unexpected if not _is_extra_state(k)]
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


def _is_extra_state(key: str) -> bool:
    return key.rsplit("/", 1)[0].endswith("_extra_state")


def _one_line(err: BaseException) -> str:
    """The cause in one line: torch's CheckpointException carries each rank's exception (and a
    formatted traceback in its text); megatron's messages may span lines."""
    if isinstance(err, CheckpointException) and err.failures:
        causes = {f"{type(exc).__name__}: {exc}" for exc, _ in err.failures.values()}
        text = "; ".join(sorted(causes))
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:600]

