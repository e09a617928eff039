"""Shared pieces of the training benchmarks: the model shapes, megalong's trainer built the way
`build_trainer` builds it (with synthetic tokens instead of a dataset), one arm of a benchmark
run in its own subprocess, and the memory readings.

Arms (what one subprocess trains):
  megalong-s2     megalong, S²-Attn, LoRA+ (adapters on q,k,v,o + embedding and norms)
  megalong-dense  megalong, dense causal attention, LoRA+
  megalong-fft    megalong, S²-Attn, full fine-tuning
  reference       benchmarks/reference_hf.py: HF Llama + PEFT LoRA+, S²-Attn (Algorithm 1)
  reference-dense the same with HF's SDPA dense attention
"""

import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("megalong-s2", "megalong-dense", "megalong-fft", "reference", "reference-dense")


@dataclass(frozen=True)
class Shape:
    hidden_size: int = 512
    ffn_hidden_size: int = 1408
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    vocab_size: int = 32000


CPU_SHAPE = Shape()
# Llama-2-7B's layer shapes (32 layers in the real model; the GPU script may use fewer).
LLAMA2_7B = Shape(4096, 11008, 32, 32, 32, 32000)


def add_shape_args(parser, default: Shape = CPU_SHAPE) -> None:
    for name, value in asdict(default).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value,
                            help=f"model shape: {name.replace('_', ' ')} (default {value})")


def shape_from_args(args) -> Shape:
    return Shape(**{name: getattr(args, name) for name in asdict(CPU_SHAPE)})


def arch_of(shape: Shape, seq_length: int):
    from megalong.config.arch import LlamaArch

    return LlamaArch(shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads,
                     shape.ffn_hidden_size, shape.vocab_size,
                     max_position_embeddings=min(seq_length, 4096))


# ------------------------------------------------------------------- memory readings


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------- megalong


def megalong_trainer(shape: Shape, seq_length: int, *, attention="s2", recompute="full",
                     full_finetune=False, bf16=False, micro_batch_size=1, lr=2e-5,
                     extra_argv=()):
    """megalong's Trainer from build_trainer, for an architecture given by shape (no preset) and
    synthetic data. `extra_argv`: more training flags (--megalong-args)."""
    sys.path.insert(0, ROOT)
    import dataclasses

    from megalong.config.job import JobConfig
    from megalong.training.setup import build_trainer

    argv = ["--seq-length", str(seq_length), "--train-iters", "1000000", "--lr", str(lr),
            "--lr-warmup-iters", "0", "--micro-batch-size", str(micro_batch_size),
            "--attention", "s2" if attention == "s2" else "full"]
    if recompute != "none":
        argv += ["--recompute-granularity", recompute]
    if full_finetune:
        argv += ["--full-finetune"]
    if bf16:
        argv += ["--bf16"]
    job = JobConfig.from_args(JobConfig.parser().parse_args(argv + list(extra_argv)))
    arch = arch_of(shape, seq_length)
    job = job.replace(model=dataclasses.replace(job.model, arch=arch))
    job = job.resolved(world_size=1, arch=arch, with_data=False)
    data = SyntheticTokens(seq_length, arch.vocab_size)
    return build_trainer(job, datasets=(data, None))


class SyntheticTokens:
    """Random token samples in the pretraining dataset's format (labels shifted by one)."""

    def __init__(self, seq_length: int, vocab_size: int, num_samples: int = 4, seed: int = 0):
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.samples = [torch.randint(0, vocab_size, (seq_length + 1,), generator=gen)
                        for _ in range(num_samples)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        import torch

        text = self.samples[index]
        return {"tokens": text[:-1], "labels": text[1:],
                "loss_mask": torch.ones(len(text) - 1, dtype=torch.float32)}


def megalong_step(trainer, iteration: int) -> float:
    from megalong.training.loop import train_step

    loss, _lr, _norm, _updated = train_step(trainer, iteration)
    return loss


# ------------------------------------------------------------------- one arm


def build_arm(arm: str, shape: Shape, seq_length: int, *, recompute: str, device: str,
              bf16: bool, megalong_args: str = ""):
    """(step function of the iteration, what it trains) for an arm, built in this process."""
    if arm.startswith("megalong"):
        if device == "cpu":
            os.environ["MEGALONG_DEVICE"] = "cpu"
        trainer = megalong_trainer(shape, seq_length, recompute=recompute, bf16=bf16,
                                   attention="dense" if arm == "megalong-dense" else "s2",
                                   full_finetune=arm == "megalong-fft",
                                   extra_argv=shlex.split(megalong_args))
        return (lambda i: megalong_step(trainer, i)), trainer
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch

    from reference_hf import build_reference, train_step

    if recompute not in ("full", "none"):
        raise SystemExit(f"the reference has whole-layer recompute or none, not {recompute}")
    model, optimizer = build_reference(
        **asdict(shape), seq_length=seq_length, recompute=recompute, device=device, bf16=bf16,
        attention="dense" if arm == "reference-dense" else "s2")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (1, seq_length), generator=gen).to(device)
    return (lambda i: train_step(model, optimizer, tokens)), model


def time_steps(step, steps: int, device: str, budget_s: float = float("inf")):
    """Wall-clock and process CPU seconds (all threads) of each step; the first is the warm-up.
    Stops early (after 2 timed steps at least) once budget_s is spent. On a shared CPU the wall
    clock grows with other jobs' load; the CPU time this process spends does much less."""
    import torch

    times, cpu_times, losses = [], [], []
    for i in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(i))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if len(times) >= 3 and sum(times) > budget_s:
            break
    return times, cpu_times, losses


def median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def run_child(script: str, argv: list, *, timeout_s: float = 3600, env=None) -> dict:
    """Runs `script --child ...` in a fresh interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    return json.loads(lines[-1])
