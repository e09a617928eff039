"""S²-Attn vs dense causal attention: forward+backward time and peak memory.

    python benchmarks/attention.py [--sizes 4096,8192,16384,32768] [--device cpu|cuda]
                                   [--ratio 0.25] [--heads 8] [--dim 64] [--json OUT]
                                   [--kernels sdpa,torch-varlen,flex]

Methods, each in a fresh subprocess per sequence length N (batch 1, G = ratio * N):
- dense: `dense_causal_attention` (SDPA, is_causal);
- s2:    `s2_attention(kernel=K)` for each of --kernels (half the heads shifted by G/2, end
         groups half size); the first call's time (a compiled kernel's compilation included)
         is reported apart;
- ideal: the kernel's ceiling for a grouped layout: SDPA causal on q/k/v reshaped to N/G
         groups of G in the batch, no shift, no copies.
Time: the fastest of --repeats wall-clock runs of forward + backward (inputs need grad), after
a small warm-up and one untimed full-size run; the fastest, not the median, because the
development machines are shared and other work only ever adds time.
Memory: peak bytes of torch tensors live at once during one forward + backward, counting only
what it allocates (outputs, saved activations, input grads, kernel workspace; not the inputs):
on CPU from torch.profiler's allocation events (profile_memory=True, a separate run), on CUDA
torch.cuda.max_memory_allocated minus the memory allocated before the run. Not the process's
resident set: the C allocator's reuse of freed pages makes ru_maxrss deltas unreliable.
The arithmetic limit of dense/s2 at G = N/4 is (N/G)^2 / (N/G - 1/4) = 4.27 (DESIGN.md §5).
"""

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("dense", "s2", "ideal")


def _child(method: str, seq_len: int, args) -> dict:
    started = time.perf_counter()
    result = _measure(method, seq_len, args)
    result["total_s"] = time.perf_counter() - started
    return result


def _measure(method: str, seq_len: int, args) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from megalong.attention import dense_causal_attention, s2_attention

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def ideal(q, k, v, group_size):
        groups = q.shape[0] // group_size
        grouped = [x.view(groups, group_size, *x.shape[2:]).transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*grouped, is_causal=True)
        return out.transpose(1, 2).reshape(q.shape)

    fns = {
        "dense": lambda q, k, v, g: dense_causal_attention(q, k, v),
        "s2": lambda q, k, v, g: s2_attention(q, k, v, g, kernel=args.kernel),
        "ideal": ideal,
    }
    fn = fns[method]

    def make(n):
        gen = torch.Generator().manual_seed(0)
        shape = (n, 1, args.heads, args.dim)
        qkv = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3)]
        return qkv, torch.randn(shape, generator=gen).to(device, dtype)

    def step(qkv, grad, n):
        for x in qkv:
            x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*qkv, int(args.ratio * n)).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def profiled_peak(qkv, grad, n):
        """Peak bytes of live torch tensors allocated during one fwd+bwd (inputs excluded)."""
        from torch.profiler import ProfilerActivity, profile

        for x in qkv:
            x.grad = None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(*qkv, int(args.ratio * n)).backward(grad)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        return peak

    small = 1024
    warm_up = step(*make(small), small)  # thread pools, kernel dispatch, lazy imports, compiling
    qkv, grad = make(seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    first = step(qkv, grad, seq_len)  # untimed: first touch of this size's memory
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    while len(times) < args.repeats and (not times or sum(times) + first < args.budget_s):
        times.append(step(qkv, grad, seq_len))
    if device.type != "cuda":
        peak = profiled_peak(qkv, grad, seq_len)
    return {"method": method, "seq_len": seq_len, "seconds": min(times),
            "first_calls_s": warm_up + first,
            "runs": len(times), "peak_bytes": peak, "threads": torch.get_num_threads(),
            "dtype": str(dtype).replace("torch.", ""), "device": device.type}


def _run(method: str, seq_len: int, args, kernel: str = "sdpa") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--sizes", str(seq_len),
           "--device", args.device, "--ratio", str(args.ratio), "--heads", str(args.heads),
           "--dim", str(args.dim), "--repeats", str(args.repeats), "--budget-s", str(args.budget_s),
           "--kernel", kernel]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4096,8192,16384,32768",
                        help="comma-separated sequence lengths")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--ratio", type=float, default=0.25, help="group size G = ratio * N")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per config (at most)")
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="stop timing a config after this many seconds (one run at least)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--kernels", default="sdpa",
                        help="comma-separated S²-Attn kernels to time (default sdpa)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--kernel", default="sdpa", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kernels = args.kernels.split(",")

    if args.child:
        print(json.dumps(_child(args.child, sizes[0], args)))
        return

    rows = []
    print(f"S²-Attn vs dense causal attention, forward+backward, b=1, {args.heads} heads, "
          f"d={args.dim}, G={args.ratio}·N, device {args.device}", file=sys.stderr)
    for seq_len in sizes:
        res = {m: _run(m, seq_len, args) for m in ("dense", "ideal")}
        for kernel in kernels:
            try:
                res["s2"] = _run("s2", seq_len, args, kernel)
            except subprocess.CalledProcessError as err:
                print(f"  N={seq_len}: S² with {kernel} failed: "
                      f"{(err.stderr or '').strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            row = {
                "seq_len": seq_len, "group_size": int(args.ratio * seq_len), "kernel": kernel,
                **{f"{m}_s": res[m]["seconds"] for m in METHODS},
                **{f"{m}_peak_mib": res[m]["peak_bytes"] / 2**20 for m in METHODS},
                "s2_first_calls_s": res["s2"]["first_calls_s"],
                "speedup": res["dense"]["seconds"] / res["s2"]["seconds"],
                "ideal_speedup": res["dense"]["seconds"] / res["ideal"]["seconds"],
                "dtype": res["s2"]["dtype"], "threads": res["s2"]["threads"],
                "runs": {m: res[m]["runs"] for m in METHODS},
            }
            row["of_ideal"] = row["speedup"] / row["ideal_speedup"]
            rows.append(row)
            print(f"  N={seq_len}: dense {row['dense_s']:.4f}s s2 ({kernel}) {row['s2_s']:.4f}s "
                  f"ideal {row['ideal_s']:.4f}s", file=sys.stderr)

    print("\n| N | G | kernel | dense fwd+bwd (ms) | S² fwd+bwd (ms) | speed-up | ideal-fold "
          "speed-up | S² / ideal | S² first calls (s) | dense peak (MiB) | S² peak (MiB) | "
          "ideal peak (MiB) |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seq_len']} | {r['group_size']} | {r['kernel']} | {1e3 * r['dense_s']:.2f} "
              f"| {1e3 * r['s2_s']:.2f} | {r['speedup']:.2f}× | {r['ideal_speedup']:.2f}× "
              f"| {100 * r['of_ideal']:.0f}% | {r['s2_first_calls_s']:.1f} "
              f"| {r['dense_peak_mib']:.0f} | {r['s2_peak_mib']:.0f} | {r['ideal_peak_mib']:.0f} |")
    if not rows:
        sys.exit(1)
    print(f"\n{rows[0]['dtype']}, {rows[0]['threads']} threads; arithmetic limit of the speed-up "
          f"at G = N/4: 4.27")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
