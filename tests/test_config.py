"""Flag validation (torch-free): clear messages naming the values and the fix."""

import subprocess
import sys

import pytest

from megalong.config.job import JobConfig
from megalong.config.model import resolve_group_size
from megalong.errors import MegalongError
from megalong.config.arch import PRESETS


def parse(*argv) -> JobConfig:
    return JobConfig.from_args(JobConfig.parser().parse_args(list(argv)))


def validate_model_args(job: JobConfig, arch) -> None:
    job.model.validate(arch, job.parallel)


@pytest.mark.parametrize("argv, fragment", [
    (["--seq-length", "6000", "--group-size-ratio", "0.3"], "not a multiple of group size 1800"),
    (["--seq-length", "8192", "--group-size", "3000"], "not a multiple of group size 3000"),
    (["--seq-length", "8192", "--group-size", "1023"], "must be even"),
    (["--seq-length", "64", "--group-size", "128"], "between 2 and seq-length 64"),
    (["--tensor-model-parallel-size", "3"], "tensor-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "3"], "pipeline-model-parallel-size 3"),
    (["--sequence-parallel"], "needs --tensor-model-parallel-size > 1"),
    (["--context-parallel-size", "16"], r"G/2 = 128\), so c can be at most 2N/G = 8"),
    (["--context-parallel-size", "3"], r"use --context-parallel-size in \{2, 4, 8\}"),
    (["--transformer-impl", "transformer_engine"], "Transformer Engine"),
    (["--rotary-seq-len-interpolation-factor", "0.5"], "must be >= 1"),
])
def test_bad_model_flags_are_named(argv, fragment):
    if "transformer_engine" in argv:
        import importlib.util
        if importlib.util.find_spec("transformer_engine"):
            pytest.skip("package installed here")
    with pytest.raises(MegalongError, match=fragment):
        validate_model_args(parse("--seq-length", "1024", *argv) if "--seq-length" not in argv
                            else parse(*argv), PRESETS["tiny"])


def test_group_size_from_ratio_and_flag():
    assert resolve_group_size(8192) == 2048
    assert resolve_group_size(8192, ratio=0.125) == 1024
    assert resolve_group_size(8192, group_size=512) == 512
    validate_model_args(parse("--seq-length", "1024", "--tensor-model-parallel-size", "2",
                              "--sequence-parallel"), PRESETS["tiny"])


def test_config_and_converter_validation_do_not_import_torch():
    code = ("import sys, argparse; import megalong.config.job, megalong.config.hf_config, "
            "megalong.config.checkpoint, megalong.errors; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("kernel, bf16, gpu, fragment", [
    ("flash", False, True, "half precision only; add --bf16"),
    ("te", False, True, "half precision only; add --bf16"),
    ("flash", True, False, "runs on CUDA GPUs only"),
    ("flash", True, True, "needs flash_attn, which is not installed"),
    ("te", True, True, "needs transformer_engine, which is not installed"),
    ("torch-varlen", False, True, "half precision only; add --bf16"),
    ("torch-varlen", True, False, "runs on CUDA GPUs only"),
    ("flex", False, False, "runs on CUDA GPUs only"),
])
def test_gpu_attention_kernels_need_bf16_a_gpu_and_their_package(kernel, bf16, gpu, fragment,
                                                                  monkeypatch):
    from megalong.config import model as config

    monkeypatch.setattr(config, "cuda_possible", lambda: gpu)
    monkeypatch.setattr(config, "importable", lambda package: False)
    with pytest.raises(MegalongError, match=fragment):
        config.validate_attention_kernel(kernel, bf16=bf16)
    monkeypatch.setattr(config, "importable", lambda package: True)
    if bf16 and gpu:
        config.validate_attention_kernel(kernel, bf16=bf16)  # all there: accepted
    if kernel in ("torch-varlen", "flex"):  # torch's own: no package to install
        monkeypatch.setattr(config, "importable", lambda package: False)
        monkeypatch.setattr(config, "cuda_possible", lambda: True)
        config.validate_attention_kernel(kernel, bf16=True)
    for fine in ("auto", "sdpa"):
        config.validate_attention_kernel(fine, bf16=False)


def test_with_flags_sets_each_setting_in_its_concern():
    job = parse("--seq-length", "8192", "--lora-rank", "4")
    changed = job.with_flags(tensor_model_parallel_size=8, bf16=True, full_finetune=True,
                             seq_length=4096)
    assert changed.parallel.tensor_model_parallel_size == 8 and changed.training.bf16
    assert changed.lora.full_finetune and changed.lora.lora_rank == 4
    assert changed.model.seq_length == 4096 and job.model.seq_length == 8192
    assert changed.flags() == {**job.flags(), "tensor_model_parallel_size": 8, "bf16": True,
                               "full_finetune": True, "seq_length": 4096}
    with pytest.raises(TypeError, match="no job setting named tp"):
        job.with_flags(tp=8)
