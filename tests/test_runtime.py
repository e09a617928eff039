"""CPU runtime details that no other test reaches."""

import pathlib
import platform
import resource

import pytest
import torch

from megalong import runtime
from megalong.config.parallel import ParallelConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
    from megalong.cli.train import build_parser

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
    """One device policy: only runtime/devices.py asks torch whether CUDA is there
    (MEGALONG_DEVICE=cpu must hold everywhere: model build, norms, logging, checkpoints)."""
    import pathlib

    import megalong

    root = pathlib.Path(megalong.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if path.relative_to(root).as_posix() != "runtime/devices.py"
                 and "cuda.is_available" in path.read_text()]
    assert offenders == []


# ---------------------------------------------------------------- the patch table


def test_every_patch_has_a_reason_a_group_and_the_version_it_was_written_for():
    from megalong.runtime import patches

    assert len(patches.PATCHES) >= 10
    for name, patch in patches.PATCHES.items():
        assert patch.name == name and callable(getattr(patches, name))
        assert patch.reason and "\n" not in patch.reason, name
        assert patch.group in patches.GROUPS, name
        assert patch.other_versions in ("warn", "raise", "skip"), name
        assert patch.written_for == patches.WRITTEN_FOR, name
        assert patches.written_for(patch, runtime.megatron_version()), name  # the installed one
    assert "megatron-core>=0.16,<0.17" in (ROOT / "setup.py").read_text()  # the pin says the same


def _megalong_sources():
    root = ROOT / "megalong"
    return [(path.relative_to(ROOT).as_posix(), path.read_text()) for path in root.rglob("*.py")
            if path.relative_to(root).parts[0] != "runtime"]


def test_only_the_runtime_patches_megatron_or_torch():
    """Warning filters, logging filters, class swaps and assignments to megatron's or torch's
    module attributes live in runtime/patches.py, each with its reason; nowhere else."""
    import re

    forbidden = re.compile(
        r"warnings\.(filterwarnings|simplefilter)\(|addFilter\(|__class__\s*=[^=]"
        # an assignment to an attribute of a megatron or torch module (or of a module imported
        # from them under a short name: rope_utils, mp_random, filesystem_async, ...)
        r"|^\s*(torch|megatron|rope_utils|mp_random|parallel_state|tensor_parallel|"
        r"filesystem_async|gpt_model|transformer_layer)(\.\w+)+\s*=[^=]", re.M)
    offenders = [f"{path}: {match.group(0).strip()}" for path, text in _megalong_sources()
                 for match in forbidden.finditer(text)]
    assert offenders == []


def test_out_of_range_megatron_version_warns_or_raises(monkeypatch):
    from megatron.core import package_info

    from megalong.errors import MegalongError
    from megalong.model.rope import rotate_half_rope
    from megalong.runtime import patches

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    monkeypatch.setattr(patches, "_WARNED", set())
    with pytest.warns(UserWarning, match="quiet_eval_notices.*written for megatron-core 0.16.x, "
                                         "and 0.17.0 is installed: applied"):
        assert patches.check_version(patches.PATCHES["quiet_eval_notices"])
    with pytest.warns(UserWarning, match="checkpoint_without_output_fp8_off.*left out"):
        assert not patches.check_version(patches.PATCHES["checkpoint_without_output_fp8_off"])
    with pytest.raises(MegalongError, match="fill_fused_rope_slot.*0.17.0"):
        runtime.fill_fused_rope_slot(rotate_half_rope)  # checked on every call
    monkeypatch.setattr(package_info, "__version__", "0.16.7")
    assert patches.check_version(patches.PATCHES["fill_fused_rope_slot"])
