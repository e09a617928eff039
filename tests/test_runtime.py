"""CPU runtime details that no other test reaches."""

import platform
import resource

import pytest
import torch

from megalong import runtime
from megalong.config.parallel import ParallelConfig


def _faults_to_fill(num_bytes: int) -> int:
    """Minor page faults taken by allocating, touching and freeing num_bytes."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(num_bytes // 4, dtype=torch.float32)
    block.fill_(1.0)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    # Blocks over glibc's largest mmap threshold (32 MiB) are by default fresh mappings that
    # fault in every page again. Each block here fits in the one freed before it (the same
    # size may not: posix_memalign asks for a little more than it last got back).
    assert runtime.keep_freed_memory()
    _faults_to_fill(64 << 20)  # the first one grows the heap
    pages = (40 << 20) // resource.getpagesize()
    again = [_faults_to_fill(mib << 20) for mib in (56, 48, 40)]
    assert max(again) < pages // 10, (again, pages)


def test_training_keeps_freed_memory_only_with_cpu_malloc_reuse(monkeypatch):
    from megalong.config.job import JobConfig
    from megalong.training import setup
    from megalong.training.pretrain import build_parser

    calls = []
    monkeypatch.setattr(runtime, "init_distributed", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "check_ranks_agree", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "use_cuda", lambda: False)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    parser = build_parser()
    cases = (([], 1), (["--cpu-malloc", "release"], 0), (["--cpu-malloc", "reuse"], 1))
    for flags, expected in cases:
        calls.clear()
        setup.bring_up_runtime(JobConfig.from_args(parser.parse_args(flags)))
        assert len(calls) == expected, flags


def context_parallel_collectives_at_init():
    """On 2 gloo ranks standing in for GPUs: the collectives init_distributed issues on the CP
    group, first on CPU, then with CUDA mocked (CPU tensors play CUDA's)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    real_init, real_all_reduce = dist.init_process_group, dist.all_reduce
    collectives = []

    def recording_all_reduce(tensor, *args, group=None, **kwargs):
        collectives.append((tuple(dist.get_process_group_ranks(group)) if group else None,
                            tensor.device.type))
        return real_all_reduce(tensor, *args, group=group, **kwargs)

    dist.all_reduce = recording_all_reduce
    runtime.init_distributed(ParallelConfig(context_parallel_size=2))
    on_cpu = list(collectives)
    collectives.clear()
    runtime.use_cuda = lambda: True
    runtime.device = lambda: torch.device("cpu")
    torch.cuda.set_device = lambda *_: None
    dist.init_process_group = lambda *a, backend=None, **k: real_init(*a, backend="gloo", **k)
    runtime.init_distributed(ParallelConfig(context_parallel_size=2))
    cp_ranks = tuple(dist.get_process_group_ranks(parallel_state.get_context_parallel_group()))
    return on_cpu, collectives, cp_ranks


@pytest.mark.slow
def test_nccl_communicator_of_the_cp_group_exists_before_the_first_halo_exchange():
    """A rank that has nothing to exchange skips the halo's batch_isend_irecv, which NCCL needs
    every rank of the group to join when it is the group's first operation: with CUDA the CP
    group gets one all-reduce on the device while the runtime comes up."""
    from megalong.spawn import run_on_ranks

    for on_cpu, on_gpu, cp_ranks in run_on_ranks(context_parallel_collectives_at_init, 2):
        assert cp_ranks == (0, 1)
        assert not [c for c in on_cpu if c[0] == cp_ranks]  # gloo needs none
        assert [c for c in on_gpu if c[0] == cp_ranks] == [(cp_ranks, "cpu")]


def test_every_device_decision_asks_the_runtime():
    """One device policy: only runtime.py asks torch whether CUDA is there (MEGALONG_DEVICE=cpu
    must hold everywhere: model build, norms, logging, checkpoints)."""
    import pathlib

    import megalong

    root = pathlib.Path(megalong.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if path.name != "runtime.py" and "cuda.is_available" in path.read_text()]
    assert offenders == []
