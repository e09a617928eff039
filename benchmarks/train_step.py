"""Whole training steps: megalong (S²-Attn + LoRA+, dense + LoRA+, full fine-tuning) against the
HF + PEFT reference (benchmarks/reference_hf.py), all in one run.

    python benchmarks/train_step.py [--seq-lengths 4096,8192] [--arms megalong-s2,reference,...]
                                    [--recompute full|selective|none] [--steps 6]
                                    [--device cpu|cuda] [--bf16] [--json OUT]
                                    [--hidden-size 512 --ffn-hidden-size 1408 --num-layers 8
                                     --num-heads 8 --num-kv-heads 2 --vocab-size 32000]

Each (arm, sequence length) trains in a fresh subprocess, batch 1, G = N/4:
- tokens/s: N / the median step time of the steps after the first (a warm-up); on CPU also
  tokens per CPU-second (process time of all its threads: what the step costs, much less
  sensitive than the wall clock to other jobs on a shared machine);
- memory: CPU: the process's peak resident set (ru_maxrss) and the same minus the resident set
  right after importing torch, megatron-core / transformers + peft (the "idle" baseline);
  GPU: torch.cuda.max_memory_allocated over the whole process (weights included);
- MFU (GPU): model FLOPs per step from megalong/plan.py's `step_flops` (2P forward + 2P input
  gradient + 2P_trainable weight gradient over the matmul parameters P, plus attention FLOPs as
  computed: causal pairs of dense or of S²-Attn's groups, forward + 2x for the backward;
  recompute's extra forward is not counted) / step time / --peak-tflops (989 for H100 bf16);
- attention share bound: the megalong-s2 and megalong-dense processes also time their attention
  call alone (forward, and forward + backward, at the model's per-layer shapes) and scale it to a
  step (layers x (fwd+bwd), plus layers x fwd with full recompute). If only attention differed,
  S² would speed the dense step up by at most
      bound = dense step / (dense step - dense attention + S² attention).

On CPU megalong keeps freed memory for reuse (runtime.keep_freed_memory, glibc mallopt); the
reference runs with glibc's defaults, as a user's script would, unless
--reference-allocator keep-freed gives it the same setting (GLIBC_TUNABLES), which isolates
what the allocator alone is worth.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (ARMS, ROOT, add_shape_args, build_arm, current_rss_bytes,  # noqa: E402
                     median, peak_rss_bytes, run_child, shape_from_args, time_steps)

DEFAULT_ARMS = "megalong-s2,reference,megalong-dense,megalong-fft"


def _attention_alone(shape, seq_length, attention, device, dtype, repeats=3, kernel="auto"):
    """Seconds of one attention call forward, and forward + backward, at the layer's shapes:
    GPU wall clock, CPU process time (comparable with the steps' CPU time)."""
    import time

    import torch

    sys.path.insert(0, ROOT)
    from megalong.attention import dense_causal_attention, s2_attention

    d = shape.hidden_size // shape.num_heads
    gen = torch.Generator().manual_seed(1)

    def make(heads):
        return torch.randn(seq_length, 1, heads, d, generator=gen).to(device, dtype).requires_grad_()

    q, k, v = make(shape.num_heads), make(shape.num_kv_heads), make(shape.num_kv_heads)
    grad = torch.randn(seq_length, 1, shape.num_heads, d, generator=gen).to(device, dtype)
    if attention == "s2":
        def fn():
            return s2_attention(q, k, v, seq_length // 4, kernel=kernel)
    else:
        def fn():
            return dense_causal_attention(q, k, v)

    clock = time.perf_counter if device == "cuda" else time.process_time

    def timed(backward):
        if device == "cuda":
            torch.cuda.synchronize()
        start = clock()
        out = fn()
        if backward:
            out.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    timed(True)  # warm-up
    fwd = median([timed(False) for _ in range(repeats)])
    fwd_bwd = median([timed(True) for _ in range(repeats)])
    return fwd, fwd_bwd


def _tensor_peak_child(args) -> dict:
    """Peak bytes of live torch tensors over the model's build and two steps (the second has
    the optimizer state), from torch.profiler's allocation events: what megalong/plan.py models,
    without the C allocator's slack that the resident set carries."""
    from torch.profiler import ProfilerActivity, profile

    arm, seq_length = args.child, int(args.seq_lengths)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step, _ = build_arm(arm, shape_from_args(args), seq_length, recompute=args.recompute,
                           device="cpu", bf16=args.bf16, megalong_args=args.megalong_args)
        losses = [step(0), step(1)]
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return {"arm": arm, "seq_length": seq_length, "tensor_peak": peak, "losses": losses,
            "peak_rss": peak_rss_bytes()}


def _child(args) -> dict:
    import torch

    if args.tensor_peak:
        return _tensor_peak_child(args)
    if args.attention_alone:
        return _attention_child(args)

    arm, seq_length = args.child, int(args.seq_lengths)
    if arm.startswith("megalong"):
        import megatron.core  # noqa: F401  (the idle baseline includes it)
    else:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    idle_rss = current_rss_bytes()
    shape = shape_from_args(args)
    device = args.device
    step, _ = build_arm(arm, shape, seq_length, recompute=args.recompute, device=device,
                       bf16=args.bf16, megalong_args=args.megalong_args)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, losses = time_steps(step, args.steps, device, budget_s=args.budget_s)
    result = {"arm": arm, "seq_length": seq_length, "step_times": times,
              "median_step_s": median(times[1:]), "step_cpu_times": cpu_times,
              "median_step_cpu_s": median(cpu_times[1:]), "losses": losses,
              "threads": torch.get_num_threads(), "idle_rss": idle_rss,
              "peak_rss": peak_rss_bytes()}
    result["tokens_per_s"] = seq_length / result["median_step_s"]
    if device == "cuda":
        result["peak_allocated"] = torch.cuda.max_memory_allocated()
    if args.profile_dir:
        _profile(step, args, arm, seq_length)
    if device == "cuda" and arm in ("megalong-s2", "megalong-dense"):
        result.update(_attention_child(args))  # GPU timings do not depend on the CPU heap
    return result


def _attention_child(args) -> dict:
    """The attention call alone. On CPU in a fresh process: timed after a training run in the
    same process, CPU attention came out up to 1.5x slower than in a clean one (the allocator's
    state after the steps), which overstated the attention share."""
    import torch

    arm, seq_length = args.child, int(args.seq_lengths)
    shape = shape_from_args(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    megalong_args = args.megalong_args.split()
    kernel = (megalong_args[megalong_args.index("--attention-kernel") + 1]
              if "--attention-kernel" in megalong_args else "auto")  # the arm's own kernel
    fwd, fwd_bwd = _attention_alone(shape, seq_length, arm.split("-")[1], args.device, dtype,
                                    kernel=kernel)
    repeated = args.recompute == "full"
    per_step = shape.num_layers * (fwd_bwd + (fwd if repeated else 0.0))
    return {"attention_fwd_s": fwd, "attention_fwd_bwd_s": fwd_bwd,
            "attention_per_step_s": per_step}


def _profile(step, args, arm, seq_length) -> None:
    """One more step under torch.profiler; the op table (self time) goes to a text file."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step(args.steps)
        if args.device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    os.makedirs(args.profile_dir, exist_ok=True)
    with open(os.path.join(args.profile_dir, f"profile_{arm}_{seq_length}.txt"), "w") as fh:
        fh.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60))
        fh.write("\n\nBy input shape:\n")
        fh.write(prof.key_averages(group_by_input_shape=True).table(
            sort_by=key, row_limit=40, max_name_column_width=60, max_shapes_column_width=80))


def _flops(args, arm, seq_length):
    sys.path.insert(0, ROOT)
    from _common import arch_of

    from megalong.config.job import JobConfig
    from megalong.plan import PlanConfig, recompute_flags, step_flops

    shape = shape_from_args(args)
    job = JobConfig().with_flags(seq_length=seq_length,
                                 attention="full" if arm.endswith("dense") else "s2",
                                 full_finetune=arm == "megalong-fft", bf16=args.bf16,
                                 **recompute_flags(args.recompute))
    return step_flops(PlanConfig(arch_of(shape, seq_length), job))


def _mib(n):
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lengths", default="4096,8192",
                        help="comma-separated sequence lengths (tokens), each timed for every arm")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated of {ARMS}")
    parser.add_argument("--recompute", choices=["full", "selective", "none"], default="full",
                        help="activation recompute of every arm (the reference: full or none)")
    parser.add_argument("--steps", type=int, default=6, help="steps per arm, the first a warm-up")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the arms this many times in turn (fresh processes) and pool "
                             "their steps: this machine's speed drifts by 15–20 %% between "
                             "minutes, and alternating spreads a slow spell over every arm")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop an arm's timing after this many seconds (3 steps at least)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where every arm trains (cuda: the first GPU)")
    parser.add_argument("--bf16", action="store_true",
                        help="every arm in bf16 (the reference casts its model; megalong trains "
                             "with --bf16)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak for MFU (H100 SXM: 989)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tensor-peak", action="store_true",
                        help="CPU: instead of timing, the peak of live torch tensors (profiler)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any arm failed")
    parser.add_argument("--profile-dir", help="also profile one extra step of each arm (op table)")
    parser.add_argument("--megalong-args", default="",
                        help="extra pretrain_longlora flags for the megalong arms, written "
                             "with '=': --megalong-args='--loss-chunk-tokens 0'")
    parser.add_argument("--reference-allocator", choices=["default", "keep-freed"],
                        default="default",
                        help="CPU: glibc's default malloc for the reference arms (as users run "
                             "them), or megalong's keep-freed-memory setting")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--attention-alone", action="store_true", help=argparse.SUPPRESS)
    add_shape_args(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return

    arms = args.arms.split(",")
    forwarded = _replace(sys.argv[1:], "--rounds", "1")
    if args.tensor_peak:  # no timing: each arm's peak of live tensors and its losses
        for seq_length, arm in ((int(n), arm) for n in args.seq_lengths.split(",") for arm in arms):
            res = _run_arm(arm, seq_length, args, forwarded)
            print(f"  {arm} N={seq_length}: " + (res.get("error") or (
                f"tensor peak {_mib(res['tensor_peak'])} MiB, losses {res['losses']}")),
                file=sys.stderr, flush=True)
        return
    rows = []
    for seq_length in [int(s) for s in args.seq_lengths.split(",")]:
        runs = {arm: [] for arm in arms}
        for round_ in range(args.rounds):  # arms alternate, so a slow spell hits all of them
            for arm in arms:
                res = _run_arm(arm, seq_length, args, forwarded)
                runs[arm].append(res)
                summary = res.get("error") or (
                    f"{res['tokens_per_s']:.0f} tok/s, median {res['median_step_s']:.2f}s wall, "
                    f"{res['median_step_cpu_s']:.2f}s CPU; steps (wall) "
                    f"{[round(t, 2) for t in res['step_times']]}, load {os.getloadavg()[0]:.1f}")
                tag = f" round {round_ + 1}/{args.rounds}" if args.rounds > 1 else ""
                print(f"  {arm} N={seq_length}{tag}: {summary}", file=sys.stderr, flush=True)
                if "error" in res:
                    print(res["stderr_tail"], file=sys.stderr)
        rows.extend(_pool(runs[arm], seq_length, args.peak_tflops * 1e12) for arm in arms)
    print(_table(rows, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    if args.strict and any("error" in r for r in rows):
        sys.exit(1)


def _run_arm(arm, seq_length, args, forwarded) -> dict:
    argv = _replace(_replace(forwarded, "--seq-lengths", str(seq_length)), "--arms", arm)
    env = None
    if arm.startswith("reference") and args.reference_allocator == "keep-freed":
        sys.path.insert(0, ROOT)
        from megalong.runtime import KEEP_FREED_GLIBC_TUNABLES

        env = {"GLIBC_TUNABLES": KEEP_FREED_GLIBC_TUNABLES}
    res = run_child("train_step.py", argv + ["--child", arm], env=env)
    res.setdefault("arm", arm)
    res.setdefault("seq_length", seq_length)
    if "error" not in res and arm in ("megalong-s2", "megalong-dense") \
            and args.device == "cpu" and not args.tensor_peak:
        res.update(run_child("train_step.py", argv + ["--child", arm, "--attention-alone"]))
    if "error" not in res and args.device == "cuda":
        res["model_flops"] = _flops(args, arm, seq_length)["model"]  # MFU: in _pool
    return res


def _pool(runs: list, seq_length: int, peak_flops: float) -> dict:
    """One arm's rounds as one row: medians over every round's steps after its warm-up, the
    largest memory, the median attention-alone time, MFU from the median step. The per-round
    step times stay in the JSON only (rounds x steps)."""
    if any("error" in r for r in runs):
        return next(r for r in runs if "error" in r)
    row = dict(runs[0])
    if len(runs) > 1:
        timed = [t for r in runs for t in r["step_times"][1:]]
        cpu = [t for r in runs for t in r["step_cpu_times"][1:]]
        row.update(median_step_s=median(timed), median_step_cpu_s=median(cpu),
                   tokens_per_s=seq_length / median(timed), rounds=len(runs),
                   step_times=[r["step_times"] for r in runs],
                   step_cpu_times=[r["step_cpu_times"] for r in runs])
        if "peak_rss" in row:  # the round that grew most above its idle resident set
            worst = max(runs, key=lambda r: r["peak_rss"] - r["idle_rss"])
            row.update(peak_rss=worst["peak_rss"], idle_rss=worst["idle_rss"])
        if "peak_allocated" in row:
            row["peak_allocated"] = max(r["peak_allocated"] for r in runs)
        for key in ("attention_fwd_s", "attention_fwd_bwd_s", "attention_per_step_s"):
            if key in row:
                row[key] = median([r[key] for r in runs])
    if "model_flops" in row:
        row["mfu"] = row["model_flops"] / row["median_step_s"] / peak_flops
    return row


def _replace(argv, flag, value):
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out + [flag, value]


def _table(rows, args) -> str:
    """GPU: wall clock, peak allocated, MFU. CPU: wall clock and process CPU time (the step's
    work, less sensitive to other jobs on a shared machine), peak resident set; the attention
    bound on CPU uses CPU times throughout."""
    gpu = args.device == "cuda"
    if gpu:
        lines = ["| N | arm | tokens/s | median step (s) | vs reference | peak alloc (MiB) "
                 "| mem vs reference | MFU |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    else:
        lines = ["| N | arm | tokens/s (wall) | vs reference | tokens per CPU-second "
                 "| vs reference | median step wall / CPU (s) | peak RSS (MiB) "
                 "| RSS over idle (MiB) | vs reference |",
                 "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_n = {}
    for r in rows:
        by_n.setdefault(r["seq_length"], {})[r["arm"]] = r
    for n, arms in by_n.items():
        ref = arms.get("reference")
        ok = ref is not None and "error" not in ref
        ratio = (lambda a, b: f"{a / b:.2f}×" if ok else "–")
        for arm, r in arms.items():
            if "error" in r:
                lines.append(f"| {n} | {arm} | failed: {r['error']} |")
                continue
            if gpu:
                lines.append(
                    f"| {n} | {arm} | {r['tokens_per_s']:.0f} | {r['median_step_s']:.3f} "
                    f"| {ratio(r['tokens_per_s'], ref['tokens_per_s']) if ok else '–'} "
                    f"| {_mib(r['peak_allocated'])} "
                    f"| {ratio(r['peak_allocated'], ref['peak_allocated']) if ok else '–'} "
                    f"| {100 * r['mfu']:.1f}% |")
                continue
            per_cpu = n / r["median_step_cpu_s"]
            over_idle = r["peak_rss"] - r["idle_rss"]
            lines.append(
                f"| {n} | {arm} | {r['tokens_per_s']:.1f} "
                f"| {ratio(r['tokens_per_s'], ref['tokens_per_s']) if ok else '–'} "
                f"| {per_cpu:.1f} "
                f"| {ratio(per_cpu, n / ref['median_step_cpu_s']) if ok else '–'} "
                f"| {r['median_step_s']:.2f} / {r['median_step_cpu_s']:.2f} "
                f"| {_mib(r['peak_rss'])} | {_mib(over_idle)} "
                f"| {ratio(over_idle, ref['peak_rss'] - ref['idle_rss']) if ok else '–'} |")
        s2, dense = arms.get("megalong-s2"), arms.get("megalong-dense")
        if s2 and dense and "error" not in s2 and "error" not in dense:
            key = "median_step_s" if gpu else "median_step_cpu_s"
            clock = "wall clock" if gpu else "CPU time"
            whole = dense[key] / s2[key]
            a_dense, a_s2 = dense["attention_per_step_s"], s2["attention_per_step_s"]
            bound = dense[key] / (dense[key] - a_dense + a_s2)
            lines.append(
                f"\nN={n} ({clock}): megalong S² vs dense, whole step: {whole:.2f}×; attention "
                f"alone per step: dense {a_dense:.2f}s ({100 * a_dense / dense[key]:.0f}% of the "
                f"dense step), S² {a_s2:.2f}s; bound if only attention changed: {bound:.2f}×\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
