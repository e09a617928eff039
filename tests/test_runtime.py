"""CPU runtime details that no other test reaches."""

import platform
import resource

import pytest
import torch

from megalong import runtime


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
        setup.bring_up_runtime(parser.parse_args(flags))
        assert len(calls) == expected, flags
