"""torch.distributed and megatron-core parallel_state bring-up, rank agreement, failures of
collectives as one-line errors, shutdown. Calls the device policy and the patches through the
`megalong.runtime` package, so a test's monkeypatch of `runtime.use_cuda` reaches them."""

import contextlib
import datetime
import os

from megalong import runtime
from megalong.config.parallel import ParallelConfig
from megalong.errors import MegalongError


def init_distributed(
    parallel: ParallelConfig = ParallelConfig(), *, seed: int = 1234, timeout_s: float = 600.0
) -> None:
    """torch.distributed from the torchrun environment (or a 1-process group without it),
    then megatron-core's parallel_state and RNG seeds. Calling it again re-lays out the same ranks."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    runtime.apply_patches()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if runtime.use_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # On GPUs, CPU tensors (loss sums, exit flags) still get collectives: gloo beside nccl.
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if runtime.use_cuda() else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel.data_parallel_size(dist.get_world_size())  # the world splits into these groups
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()  # re-laying out the same ranks (tests, tools)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        # megatron's TP/PP/DP/CP groups: the same timeout as the world group (its default is 30).
        distributed_timeout_minutes=timeout_s / 60.0,
    )
    if runtime.use_cuda() and parallel.context_parallel_size > 1:
        _create_context_parallel_communicator()
    runtime.seed_everything(seed)


def _create_context_parallel_communicator() -> None:
    """NCCL creates a group's communicator lazily, at its first CUDA operation, and when that
    operation is a `batch_isend_irecv` every rank of the group must take part (torch's note on
    it). The halo exchange skips ranks with nothing to send or receive (TP >= 2, CP >= 3,
    L % G == G/2), so its first call could leave the others waiting: one tiny all-reduce on the
    CP group creates the communicator first. (A barrier would not: under the mixed
    `cpu:gloo,cuda:nccl` backend it goes to gloo. Passing `device_id` to init_process_group
    would create every group's communicator eagerly, at a memory cost not measured here.)"""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.all_reduce(torch.zeros(1, device=runtime.device()),
                    group=parallel_state.get_context_parallel_group())


def check_ranks_agree(settings: dict, what: str = "configuration") -> None:
    """Collective: every rank must hold the same `settings` (e.g. the parsed flags), else every
    rank raises the same error naming the first flags that differ. Costs one all-gather of a
    64-bit hash; the full settings are gathered only when the hashes differ."""
    import hashlib
    import json

    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return
    text = json.dumps(settings, sort_keys=True, default=repr)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64, device=runtime.device())
    hashes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(hashes, mine)
    if len({int(h.item()) for h in hashes}) == 1:
        return
    everyone = [None] * world
    dist.all_gather_object(everyone, json.loads(text))
    reference = everyone[0]
    for rank, other in enumerate(everyone):
        differing = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
        if differing:
            shown = "; ".join(f"--{k.replace('_', '-')} {reference.get(k)!r} on rank 0 but "
                              f"{other.get(k)!r} on rank {rank}" for k in differing[:3])
            more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
            raise MegalongError(f"the ranks disagree on the {what}: {shown}{more}; launch every "
                                "rank (every node) with the same flags")


_DISTRIBUTED_FAILURE = ("timed out", "timeout", "connection closed", "connection reset",
                        "broken pipe", "nccl", "gloo", "socket")


@contextlib.contextmanager
def distributed_failures_as_errors(timeout_minutes: float):
    """A collective that fails because another rank died or hangs (gloo/NCCL errors, timeouts)
    becomes one line naming the cause, instead of a traceback from deep inside torch; the
    launcher (torchrun) then stops the remaining ranks. Other exceptions pass unchanged."""
    import torch.distributed as dist

    try:
        yield
    except MegalongError:
        raise
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        if not (isinstance(err, dist.DistError)
                or any(word in first.lower() for word in _DISTRIBUTED_FAILURE)):
            raise
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        raise MegalongError(
            f"rank {rank}: a collective operation failed ({first}): another rank died or stopped "
            f"responding (its own log names the cause); collectives wait at most "
            f"--distributed-timeout-minutes {timeout_minutes:g}") from err


def shutdown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT; the OS may hand it out again later)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
