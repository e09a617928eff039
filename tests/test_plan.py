"""megalong/plan.py and tools/plan.py: hand-computed counts, FLOPs and memory terms, clear errors,
and the estimate against the measured peak of live torch tensors of real CPU training steps."""

import json
import os
import subprocess
import sys

import pytest

from megalong.errors import MegalongError
from megalong.config.arch import PRESETS, LlamaArch
from megalong.config.job import JobConfig
from megalong.plan import (PlanConfig, adapter_params, attention_pairs, layer_activation_bytes,
                           memory_breakdown, parameter_counts, recompute_flags, step_flops)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# H=64, 2 layers, 4 heads of d=16, 2 kv heads, ffn 160, vocab 1000 (padded to 1024).
SMALL = LlamaArch(64, 2, 4, 2, 160, 1000)


def plan(arch, seq_length, *, recompute="full", recompute_layers=None, bf16=True, gpu=True,
         **flags):
    """The plan of a job given by its flags' names (bf16 and full recompute unless told)."""
    job = JobConfig().with_flags(seq_length=seq_length, bf16=bf16,
                                 **recompute_flags(recompute, recompute_layers), **flags)
    return PlanConfig(arch, job, gpu=gpu)


def test_parameter_counts_by_hand():
    cfg = plan(SMALL, 256, bf16=False)
    # Per layer: qkv 64*(4+2*2)*16 = 8192, proj 64*64 = 4096, fc1 2*64*160 = 20480,
    # fc2 160*64 = 10240 -> 43008; norms 2*64. Embedding and lm_head 1024*64 each; final norm 64.
    counts = parameter_counts(cfg)
    assert counts["base"] == 2 * (43008 + 128) + 2 * 65536 + 64
    # LoRA r=8 on q,k,v,o: q 8*64 + 64*8, k and v 8*64 + 32*8 each, o 8*64 + 64*8 -> 3584 a layer.
    assert adapter_params(cfg, per_rank=False) == 3584
    assert counts["adapters"] == 2 * 3584
    # Trainable: adapters, norms (2 per layer + the final one) and the embedding; not lm_head.
    assert counts["trainable"] == 2 * 3584 + 2 * 128 + 64 + 65536
    # TP=2: column B and row A halve; vocab padded to 128*2 = 256 multiples, split in two.
    tp2 = plan(SMALL, 256, tensor_model_parallel_size=2, bf16=False)
    assert adapter_params(tp2, per_rank=True) == 3 * 512 + (256 + 128 + 128) + (256 + 512)
    assert parameter_counts(tp2)["base"] == 2 * (43008 // 2 + 128) + 2 * 512 * 64 + 64
    full = plan(SMALL, 256, full_finetune=True, bf16=False)
    assert parameter_counts(full)["trainable"] == parameter_counts(full)["base"]


def test_attention_pairs_by_hand():
    assert attention_pairs(8, 4, "full") == {"unshifted": 36, "shifted": 36}
    # G=4: unshifted groups [0,4) [4,8): 2 * 10; shifted [0,2) [2,6) [6,8): 3 + 10 + 3.
    assert attention_pairs(8, 4, "s2") == {"unshifted": 20, "shifted": 16}


def test_step_flops_by_hand():
    arch = LlamaArch(64, 1, 4, 4, 128, 1000)  # d = 16, MHA
    cfg = plan(arch, 8, group_size_ratio=0.5, recompute="none")
    linears = 64 * 12 * 16 + 64 * 64 + 3 * 64 * 128
    lm_head = 1024 * 64
    adapters = 4 * (8 * 64 + 64 * 8)
    matmul = linears + lm_head + adapters
    # 4 heads: 2 unshifted (20 pairs each), 2 shifted (16 each) -> 72 pairs; 4*d flops each.
    attn_fwd = 4 * 16 * 72
    expected = 8 * (2 * matmul + 2 * matmul + 2 * adapters) + 3 * attn_fwd
    flops = step_flops(cfg)
    assert flops["model"] == expected
    assert flops["attention"] == 3 * attn_fwd
    assert flops["hardware"] == expected
    full = step_flops(plan(arch, 8, group_size_ratio=0.5))
    assert full["hardware"] == expected + 8 * 2 * matmul + attn_fwd  # one more forward
    dense = step_flops(plan(arch, 8, attention="full", recompute="none"))
    assert dense["attention"] == 3 * 4 * 16 * 4 * 36


def test_memory_terms_by_hand():
    cfg = plan(SMALL, 256, bf16=False, recompute="full", gpu=False)
    mem = memory_breakdown(cfg)
    counts = parameter_counts(cfg)
    assert mem["weights"] == 4 * counts["base"]
    assert mem["gradients"] == 4 * counts["trainable"]
    assert mem["optimizer"] == 8 * counts["trainable"]
    bf16 = memory_breakdown(plan(SMALL, 256, bf16=True))
    assert bf16["weights"] == 2 * counts["base"]
    assert bf16["optimizer"] == 12 * counts["trainable"]  # + float32 master weights
    # One layer, fp32, LoRA q,k,v,o, unfused SwiGLU, T = 256 tokens: norms 2 x (input + normed),
    # norm output for A, V's copy (32 wide), q and k after RoPE (64 + 32), kernel output and
    # proj's input (2 x 64), fc1 output (320) and silu's (160), the shifted end groups
    # (G = 64 tokens of 32 + 32 widths).
    layer = layer_activation_bytes(cfg)
    assert sum(layer.values()) == 4 * 256 * (4 * 64 + 64 + 32 + 96 + 128 + 480) + 4 * 64 * 64
    # Full recompute: every layer's input, then the larger of the loss moment (final norm's two
    # tensors, 1024-wide float32 logits, the chunked loss's 64-wide input gradient) and one
    # layer's backward (its saved tensors plus the gradients in flight: 2 x 64 + 2 x 160 +
    # 2 x (64 + 2 x 32) wide).
    checkpoints = 2 * 4 * 256 * 64
    loss = 2 * 4 * 256 * 64 + 4 * 256 * 1024 + 4 * 256 * 64
    layer_backward = sum(layer.values()) + 4 * 256 * (128 + 320 + 256)
    assert mem["activations"] == checkpoints + max(loss, layer_backward)
    assert layer_backward > loss  # a small vocabulary: the layer's moment is the peak


def test_recompute_orders_memory_and_sequence_parallel_shrinks_it():
    arch = PRESETS["llama2-7b"]
    totals = {r: memory_breakdown(plan(arch, 32768, recompute=r))["total"]
              for r in ("none", "selective", "full")}
    assert totals["none"] > totals["selective"] > totals["full"]
    tp = plan(PRESETS["llama2-70b"], 32768, tensor_model_parallel_size=8)
    sp = plan(PRESETS["llama2-70b"], 32768, tensor_model_parallel_size=8, sequence_parallel=True)
    assert memory_breakdown(sp)["activations"] < memory_breakdown(tp)["activations"] / 4


def test_block_recompute_sits_between_none_and_full():
    """Block recompute of K of a stage's L layers: K layers keep their input, L - K everything;
    the recompute FLOPs are K/L of full's."""
    arch = PRESETS["llama2-7b"]
    base = dict(arch=arch, seq_length=32768, tensor_model_parallel_size=8,
                sequence_parallel=True)
    full = plan(**base, recompute="full")
    none = plan(**base, recompute="none")
    assert memory_breakdown(plan(**base, recompute="full", recompute_layers=32)) == \
        memory_breakdown(full)
    repeat = (lambda c: step_flops(c)["hardware"] - step_flops(c)["model"])
    totals = [memory_breakdown(plan(**base, recompute="full", recompute_layers=k))["total"]
              for k in (8, 16, 24)]
    assert memory_breakdown(none)["total"] > totals[0] > totals[1] > totals[2] > \
        memory_breakdown(full)["total"]
    # Each recomputed layer trades its saved tensors for its input.
    layer = sum(layer_activation_bytes(full).values())
    checkpoint = 2 * 32768 * 4096 / 8
    assert totals[0] - totals[1] == pytest.approx(8 * (layer - checkpoint))
    block = plan(**base, recompute="full", recompute_layers=8)
    assert repeat(block) == pytest.approx(repeat(full) / 4)
    with pytest.raises(MegalongError, match="recompute_method block needs recompute_granularity "
                                            "full and recompute_num_layers in 1..32"):
        plan(**base, recompute="none", recompute_layers=4)
    with pytest.raises(MegalongError, match="recompute_method block needs .* got "
                                            "recompute_granularity full, recompute_num_layers 33"):
        plan(**base, recompute="full", recompute_layers=33)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(MegalongError, match="tp 3 must divide"):
        plan(PRESETS["llama2-70b"], 4096, tensor_model_parallel_size=3)
    with pytest.raises(MegalongError, match="recompute must be one of"):
        plan(SMALL, 256, recompute="some")
    job = JobConfig().with_flags(seq_length=256)
    with pytest.raises(MegalongError, match="recompute_granularity must be full, selective or"):
        PlanConfig(SMALL, job.with_flags(recompute_granularity="some"))
    with pytest.raises(MegalongError, match="selective recompute of core_attn only"):
        PlanConfig(SMALL, job.with_flags(recompute_granularity="selective",
                                         recompute_modules=("core_attn", "mlp")))
    with pytest.raises(MegalongError, match="--lora-rank must be >= 1"):
        PlanConfig(SMALL, job.with_flags(lora_rank=0))
    with pytest.raises(MegalongError, match="not a multiple of group size"):
        PlanConfig(SMALL, job.with_flags(seq_length=250))  # G = 62 does not divide N
    with pytest.raises(TypeError, match="no job setting named tp"):
        job.with_flags(tp=2)


def test_plan_reads_the_job_configuration():
    """The planner's facts are the job's settings, under training's flag names: parallel sizes,
    micro batch, precision, recompute (granularity, method, layers), LoRA (rank, targets,
    trainable extras, full fine-tuning), attention and loss chunks."""
    argv = ["--seq-length", "4096", "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2", "--context-parallel-size", "2",
            "--sequence-parallel", "--micro-batch-size", "2", "--bf16",
            "--recompute-granularity", "full", "--recompute-method", "block",
            "--recompute-num-layers", "1", "--lora-rank", "4", "--lora-targets", "q,v,fc2",
            "--trainable-params", "norm", "--group-size", "1024", "--loss-chunk-tokens", "512"]
    job = JobConfig.from_args(JobConfig.parser().parse_args(argv))
    cfg = PlanConfig(SMALL, job)
    assert (cfg.seq_length, cfg.tokens, cfg.stage_layers, cfg.group_size) == (4096, 4096, 1, 1024)
    assert (cfg.recompute, cfg.recomputed_layers, cfg.recompute_label) == ("full", 1, "block 1")
    assert cfg.adapted_parts == ("q", "v", "down") and cfg.param_bytes == 2
    assert cfg.padded_vocab == 1024
    # Uniform full recompute: every layer of the stage; none and selective: none recomputed.
    uniform = PlanConfig(SMALL, job.with_flags(recompute_method="uniform"))
    assert (uniform.recomputed_layers, uniform.recompute_label) == (1, "full")
    for flags, label in ((recompute_flags("none"), "none"),
                         (recompute_flags("selective"), "selective")):
        other = PlanConfig(SMALL, job.with_flags(**flags))
        assert (other.recompute_label, other.recomputed_layers) == (label, 0)
    # Each fact moves the plan the way its flag says.
    counts = parameter_counts(cfg)
    plain = parameter_counts(PlanConfig(SMALL, job.with_flags(trainable_params=())))
    # pp = 2, one layer a stage: the last stage's norms (2 x 64 + the final 64) stop training.
    assert counts["trainable"] - plain["trainable"] == 2 * 64 + 64
    # Rank 4 on q, v (column: B split over TP 2) and down (row: A split): q 4*64 + 64*4/2,
    # v 4*64 + 32*4/2, down 4*160/2 + 64*4.
    assert counts["adapters"] == (256 + 128) + (256 + 64) + (320 + 256)
    assert step_flops(cfg)["per_gpu_model"] == step_flops(cfg)["model"] / 8
    full = PlanConfig(SMALL, job.with_flags(full_finetune=True))
    assert full.adapted_parts == () and adapter_params(full, per_rank=True) == 0


def test_cli_table_and_errors():
    tool = os.path.join(ROOT, "tools", "plan.py")
    done = subprocess.run([sys.executable, tool, "--model", "llama2-70b", "--seq-length", "32768",
                           "--tp", "8", "--cp", "1", "--pp", "1", "--bf16"],
                          capture_output=True, text=True, check=True)
    assert "total per GPU" in done.stdout and "fits in 80 GiB" in done.stdout
    bad = subprocess.run([sys.executable, tool, "--model", "llama2-70b", "--seq-length", "32768",
                          "--tp", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: tp 3 must divide")
    headroom = subprocess.run([sys.executable, tool, "--model", "llama2-7b", "--seq-length", "8192",
                               "--headroom", "1.5"], capture_output=True, text=True)
    assert headroom.returncode == 2 and "--headroom must be in [0, 1)" in headroom.stderr
    headroom = subprocess.run([sys.executable, tool, "--table", "--headroom", "-0.1"],
                              capture_output=True, text=True)
    assert headroom.returncode == 2 and "--headroom must be in [0, 1)" in headroom.stderr
    search = subprocess.run([sys.executable, tool, "--model", "llama2-70b", "--seq-length",
                             "32768", "--bf16", "--search", "8"], capture_output=True, text=True,
                            check=True).stdout
    assert "at most 72.00 GiB planned" in search and "| block " in search
    table = subprocess.run([sys.executable, tool, "--table"], capture_output=True, text=True,
                           check=True)
    assert table.stdout.count("| llama2-") == 9


# Measured on CPU: the peak of live torch tensors over building the model and two training
# steps (benchmarks/train_step.py --tensor-peak, torch.profiler's allocation events), against
# plan's total. docs/PERF.md has the same comparison at the benchmark's 4k/8k shapes.
MEASURED_SHAPE = ["--hidden-size", "256", "--ffn-hidden-size", "704", "--num-layers", "4",
                  "--num-heads", "4", "--num-kv-heads", "2", "--vocab-size", "8000"]


@pytest.mark.slow
@pytest.mark.parametrize("arm,recompute,chunk,block", [
    ("megalong-s2", "full", 2048, None), ("megalong-fft", "full", 2048, None),
    ("megalong-s2", "none", 2048, None), ("megalong-s2", "full", 0, None),
    ("megalong-fft", "full", 256, None), ("megalong-s2", "full", 2048, 2)])
def test_estimate_within_15_percent_of_measured_peak(arm, recompute, chunk, block):
    seq_length = 2048
    extra = f" --recompute-method block --recompute-num-layers {block}" if block else ""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--child", arm,
         "--recompute", recompute, "--seq-lengths", str(seq_length), "--tensor-peak",
         f"--megalong-args=--loss-chunk-tokens {chunk}{extra}", *MEASURED_SHAPE],
        capture_output=True, text=True, timeout=280, env={**os.environ, "MEGALONG_DEVICE": "cpu",
                                                          "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["tensor_peak"]
    cfg = plan(LlamaArch(256, 4, 4, 2, 704, 8000), seq_length, bf16=False,
               recompute=recompute, full_finetune=arm == "megalong-fft", gpu=False,
               loss_chunk_tokens=chunk, recompute_layers=block,
               attention="full" if arm == "megalong-dense" else "s2")
    estimate = memory_breakdown(cfg)["total"]
    assert abs(estimate - measured) <= 0.15 * measured, (estimate, measured)
