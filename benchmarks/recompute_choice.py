"""megatron-core's recompute options against each other, S²-Attn + LoRA+ whole steps.

    python benchmarks/recompute_choice.py [--rounds 3] [--seq-length 8192] [--steps 4]
                                          [--device cpu|cuda] [--json OUT]

Options (each a fresh `train_step.py` process per round; options alternate within a round, so
a slow spell of a shared machine hits every one):
- full:        megatron's full recompute, every layer
- block-K:     megatron's full recompute of the first K layers of the stage only
- sel-ln-mlp:  megatron's selective recompute of the norms and the MLP (attention kept as is)
- sel-all:     selective recompute of core attention, norms and MLP
Memory: RSS over idle on CPU, peak allocated on GPU. On 2026-12-06 this script also timed
megalong's own "kept attention" (attention kept through full recompute): 4.9 % faster than full
recompute, the fastest of these within its memory, against the 10 % issue 23 asked for, so it was
removed (docs/PERF.md has the table).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

OPTIONS = {
    "full": ("full", ""),
    "block-4": ("full", "--recompute-method block --recompute-num-layers 4"),
    "sel-ln-mlp": ("selective", "--recompute-modules layernorm mlp"),
    "sel-all": ("selective", "--recompute-modules core_attn layernorm mlp"),
}


def _run(option: str, args, out: str) -> dict:
    recompute, extra = OPTIONS[option]
    cmd = [sys.executable, os.path.join(HERE, "train_step.py"), "--seq-lengths",
           str(args.seq_length), "--arms", "megalong-s2", "--recompute", recompute,
           "--steps", str(args.steps), "--device", args.device, "--json", out]
    if args.bf16:
        cmd.append("--bf16")
    if extra:
        cmd.append(f"--megalong-args={extra}")
    subprocess.run(cmd, check=True)
    with open(out) as handle:
        return json.load(handle)[0]


def _memory(row) -> float:
    if "peak_allocated" in row:
        return row["peak_allocated"] / 2**20
    return (row["peak_rss"] - row["idle_rss"]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4, help="per option and round; first warms up")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--json", help="also write the pooled results here")
    args = parser.parse_args()
    options = args.options.split(",")
    runs = {option: [] for option in options}
    for round_ in range(args.rounds):
        for option in options:
            row = _run(option, args, f"/tmp/recompute_choice_{os.getpid()}.json")
            runs[option].append(row)
            print(f"[recompute_choice] round {round_ + 1}/{args.rounds} {option}: "
                  f"{row['median_step_s']:.2f} s wall, {row['median_step_cpu_s']:.2f} s CPU, "
                  f"{_memory(row):,.0f} MiB, losses {row['losses']}", file=sys.stderr, flush=True)
    pooled = {}
    for option, rows in runs.items():
        wall = statistics.median(t for r in rows for t in r["step_times"][1:])
        cpu = statistics.median(t for r in rows for t in r["step_cpu_times"][1:])
        pooled[option] = {"wall_s": wall, "cpu_s": cpu, "memory_mib": max(map(_memory, rows)),
                          "per_round_wall_s": [r["median_step_s"] for r in rows]}
    print("\n| option | median step wall (s) | CPU (s) | memory (MiB) | per-round wall (s) |")
    print("|---|---:|---:|---:|---|")
    for option, p in pooled.items():
        print(f"| {option} | {p['wall_s']:.2f} | {p['cpu_s']:.2f} | {p['memory_mib']:,.0f} | "
              f"{', '.join(f'{t:.2f}' for t in p['per_round_wall_s'])} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"runs": runs, "pooled": pooled}, handle, indent=1)


if __name__ == "__main__":
    main()
