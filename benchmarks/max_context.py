"""The longest sequence that trains one step within a memory budget: megalong vs the HF + PEFT
reference (benchmarks/reference_hf.py), S²-Attn vs dense.

    python benchmarks/max_context.py [--budget-gib 4] [--arms megalong-s2,reference,...]
                                     [--recompute full|none] [--granularity 1024]
                                     [--start 2048] [--max 262144] [--json OUT]
                                     [--megalong-args='--cpu-malloc release']
                                     [--hidden-size 512 ... (benchmarks/train_step.py's shape)]

A probe trains one step (batch 1, G = N/4) at one length in a fresh subprocess; it fits when it
finishes and its peak resident set (ru_maxrss: the whole process, Python, torch and the libraries
included) is at most the budget. A watchdog ends a probe once its resident set passes the
budget (so a too-long probe stops early instead of swapping). Lengths double from --start until
one does not fit, then a binary search between the last fit and the first failure narrows to
--granularity tokens. CPU only (the resident set is the memory that matters there).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (ARMS, add_shape_args, build_arm, peak_rss_bytes,  # noqa: E402
                     shape_from_args)

GIB = 2**30


def _child(args) -> dict:
    os.environ["MEGALONG_DEVICE"] = "cpu"
    step, _ = build_arm(args.child, shape_from_args(args), args.probe, recompute=args.recompute,
                        device="cpu", bf16=False, megalong_args=args.megalong_args)
    loss = step(0)
    return {"arm": args.child, "seq_length": args.probe, "loss": loss,
            "peak_rss": peak_rss_bytes()}


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def probe(arm: str, seq_length: int, args, forwarded) -> dict:
    """One step at seq_length in a subprocess, watched against the budget."""
    budget = args.budget_gib * GIB
    cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--child", arm,
           "--probe", str(seq_length)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MEGALONG_DEVICE": "cpu"})
    watched_peak, killed = 0, False
    while proc.poll() is None:
        watched_peak = max(watched_peak, _rss_of(proc.pid))
        if watched_peak > budget:
            proc.kill()
            killed = True
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    result = {"arm": arm, "seq_length": seq_length, "seconds": time.monotonic() - started}
    lines = out.strip().splitlines()
    if killed:
        result.update(fits=False, why=f"resident set passed the budget ({watched_peak / GIB:.2f} GiB)",
                      peak_rss=watched_peak)
    elif proc.returncode or not lines:
        memory_error = "MemoryError" in err or "out of memory" in err.lower()
        result.update(fits=False, why="out of memory" if memory_error else f"exit {proc.returncode}",
                      stderr_tail=err[-1500:])
    else:
        child = json.loads(lines[-1])
        result.update(peak_rss=child["peak_rss"], loss=child["loss"],
                      fits=child["peak_rss"] <= budget,
                      why="" if child["peak_rss"] <= budget else "peak over the budget")
    return result


def longest(arm: str, args, forwarded, log) -> dict:
    probes = []

    def fits(n):
        res = probe(arm, n, args, forwarded)
        probes.append(res)
        peak = f"{res['peak_rss'] / GIB:.2f} GiB" if "peak_rss" in res else "–"
        log(f"  {arm} N={n}: {'fits' if res['fits'] else 'no: ' + res['why']} (peak {peak}, "
            f"{res['seconds']:.0f} s)")
        return res["fits"]

    good, bad = 0, None
    n = args.start
    while n <= args.max:
        if fits(n):
            good, n = n, n * 2
        else:
            bad = n
            break
    if good == 0:
        return {"arm": arm, "longest": 0, "probes": probes}
    if bad is not None:
        while bad - good > args.granularity:
            mid = (good + bad) // 2 // args.granularity * args.granularity
            if mid in (good, bad):
                break
            if fits(mid):
                good = mid
            else:
                bad = mid
    return {"arm": arm, "longest": good, "first_failure": bad, "probes": probes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-gib", type=float, default=4.0,
                        help="peak resident set allowed for the training process (GiB)")
    parser.add_argument("--arms", default="megalong-s2,reference,megalong-dense,reference-dense")
    parser.add_argument("--recompute", choices=["full", "none"], default="full")
    parser.add_argument("--granularity", type=int, default=1024)
    parser.add_argument("--start", type=int, default=2048)
    parser.add_argument("--max", type=int, default=262144)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--megalong-args", default="",
                        help="extra pretrain_longlora flags for the megalong arms, written "
                             "with '=': --megalong-args='--cpu-malloc release'")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    add_shape_args(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    if args.start % args.granularity or args.granularity % 8:
        raise SystemExit("--start must be a multiple of --granularity, itself a multiple of 8 "
                         "(S²-Attn needs N divisible by G = N/4, G even)")
    forwarded, skip = [], False  # the children get the shape and recompute flags
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--json="):
            skip = False
            continue
        skip = arg == "--json"
        if not skip:
            forwarded.append(arg)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"longest sequence within {args.budget_gib:g} GiB peak RSS, recompute {args.recompute}")
    results = [longest(arm, args, forwarded, log) for arm in args.arms.split(",")]
    ref = {r["arm"]: r["longest"] for r in results}
    print("\n| arm | longest N that trains a step | first N that does not | vs reference |")
    print("|---|---:|---:|---:|")
    for r in results:
        base = ref.get("reference-dense" if r["arm"].endswith("dense") and "reference-dense" in ref
                       else "reference")
        ratio = f"{r['longest'] / base:.2f}×" if base else "–"
        print(f"| {r['arm']} | {r['longest']:,} | {r.get('first_failure') or '–'} | {ratio} |")
    print(f"\nbudget {args.budget_gib:g} GiB peak resident set per training process; "
          f"granularity {args.granularity}; recompute {args.recompute}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"budget_gib": args.budget_gib, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
