"""The attention-pattern table of examples/ablation_patterns.sh (the LongLoRA paper's Table 6 in
miniature), from its perplexity reports and training logs (torch-free):

  python -m megalong.eval.pattern_ablation WORK --base-length 256 --targets 512,1024,2048

reads WORK/eval/N{N}_{arm}_{dense|own}.json (arm: full, short, s2, base_pi; "own" is the arm's
training pattern at evaluation; the dense reports also hold the repeat probe's row; also
N{base}_base_dense.json, the base model at its own context) and WORK/logs/N{N}_{arm}.log, and writes WORK/table.md (printed
too), WORK/summary.json and WORK/ablation_patterns.png. Intervals are 95% bootstrap intervals
over the evaluation windows (eval/bootstrap.py); differences are paired on the same windows.
"""

import argparse
import os
import re
import statistics
import sys
from typing import Optional

from megalong.errors import MegalongError, run_cli
from megalong.eval.bootstrap import paired_ppl_difference, ppl_interval
from megalong.eval.report import pyplot, read_json, write_json

ARMS = {"full": "full attention", "short": "short attention (groups, no shift)",
        "s2": "S²-Attn"}
BASELINE = "base_pi"


def _row(report: dict, seq_length: int, probe=None) -> Optional[dict]:
    for row in report["results"]:
        if row["seq_length"] == seq_length and row.get("probe") == probe:
            return row
    return None


def load_results(work: str, targets) -> dict:
    """{(N, arm, eval): row} for every report row that exists; eval is "dense", "own" (grouped
    arms) or "probe" (the dense report's repeat-probe row)."""
    results = {}
    for seq_length in targets:
        for arm in (*ARMS, BASELINE, "base"):
            for evaluated in ("dense", "own"):
                path = os.path.join(work, "eval", f"N{seq_length}_{arm}_{evaluated}.json")
                if not os.path.exists(path):
                    continue
                report = read_json(path)
                row = _row(report, seq_length)
                if row is None:
                    raise MegalongError(f"report {path} has no row for seq-length {seq_length}")
                results[(seq_length, arm, evaluated)] = row
                probe = _row(report, seq_length, "repeat")
                if probe is not None:
                    results[(seq_length, arm, "probe")] = probe
    return results


def training_stats(log_path: str) -> dict:
    """Median logged tokens/s and the last logged loss of a training log."""
    if not os.path.exists(log_path):
        return {}
    with open(log_path, errors="replace") as handle:
        text = handle.read()
    rates = [float(x.replace(",", "")) for x in re.findall(r"\| ([\d,]+) tok/s", text)]
    losses = re.findall(r"\| loss ([\d.]+)", text)
    trainable = re.findall(r"trainable parameters: ([\d,]+) of ([\d,]+)", text)
    return {"tokens_per_s": statistics.median(rates) if rates else None,
            "final_loss": float(losses[-1]) if losses else None,
            "trainable": f"{trainable[-1][0]} of {trainable[-1][1]}" if trainable else None}


def _cell(row: dict, cells: dict, key: str) -> str:
    """The row's perplexity with its interval, recorded under `key` in the summary's cells."""
    low, high = ppl_interval(row["window_losses"])
    cells[key] = {"ppl": row["ppl"], "interval": [low, high]}
    return f"{row['ppl']:.2f} [{low:.2f}, {high:.2f}]"


def _evaluated_with(arm: str, evaluated: str) -> str:
    return "dense" if evaluated == "dense" else ARMS[arm].split(" (")[0]


def _diff(row: dict, reference: dict) -> str:
    delta, low, high = paired_ppl_difference(row["window_losses"], reference["window_losses"])
    return f"{delta:+.2f} [{low:+.2f}, {high:+.2f}]"


def summarize(work: str, base_length: int, targets) -> tuple[str, dict]:
    results = load_results(work, targets)
    own = load_results(work, [base_length])
    heading = " | ".join(f"N={n} ({n // base_length}x), G={n // 4} = {n / 4 / base_length:g}x base"
                         for n in targets)
    lines = ["Perplexity on held-out text at the target length N, 95% bootstrap interval over the "
             "windows:", "",
             f"| trained with | evaluated with | {heading} |",
             "|---|---|" + "---:|" * len(targets)]
    summary = {"base_length": base_length, "targets": list(targets), "cells": {}}
    rows = [(BASELINE, "dense", "base + PI (no training)")]
    rows += [(arm, evaluated, label) for arm, label in ARMS.items()
             for evaluated in (("dense",) if arm == "full" else ("dense", "own"))]
    for arm, evaluated, label in rows:
        cells = []
        for n in targets:
            row, key = results.get((n, arm, evaluated)), f"N{n}_{arm}_{evaluated}"
            cells.append(_cell(row, summary["cells"], key) if row else "-")
            if row:
                summary["cells"][key].update(group_size=row.get("group_size"),
                                             windows=row["windows"])
        lines.append(f"| {label} | {_evaluated_with(arm, evaluated)} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences against full-attention training evaluated dense (same "
              "windows; an interval that excludes 0 is a gap the windows cannot explain):", "",
              f"| trained with | evaluated with | {heading} |",
              "|---|---|" + "---:|" * len(targets)]
    for arm in ("short", "s2"):
        for evaluated in ("dense", "own"):
            cells = []
            for n in targets:
                row, ref = results.get((n, arm, evaluated)), results.get((n, "full", "dense"))
                cells.append(_diff(row, ref) if row and ref else "-")
            lines.append(f"| {ARMS[arm]} | {_evaluated_with(arm, evaluated)} | "
                         + " | ".join(cells) + " |")
    lines += ["", "The shift's own effect: S²-Attn minus short attention, paired on the same "
              "windows:", "", f"| evaluated with | {heading} |", "|---|" + "---:|" * len(targets)]
    for evaluated, label in (("dense", "dense"), ("own", "each its own pattern"),
                             ("probe", "repeat probe, dense")):
        cells = []
        for n in targets:
            row, ref = results.get((n, "s2", evaluated)), results.get((n, "short", evaluated))
            cells.append(_diff(row, ref) if row and ref else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Repeat probe, dense attention: perplexity of the second copy in windows whose "
              "second half repeats the first (retrieving it takes attention N/2 = 2G tokens "
              "back), 95% bootstrap interval:", "",
              f"| trained with | {heading} |", "|---|" + "---:|" * len(targets)]
    for arm, label in ((BASELINE, "base + PI (no training)"), *ARMS.items()):
        cells = []
        for n in targets:
            row = results.get((n, arm, "probe"))
            cells.append(_cell(row, summary["cells"], f"N{n}_{arm}_probe") if row else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    base_rows = [own.get((base_length, "base", kind)) for kind in ("dense", "probe")]
    if all(base_rows):
        ordinary, probe = (_cell(row, summary["cells"], f"N{base_length}_base_{kind}")
                           for row, kind in zip(base_rows, ("dense", "probe")))
        lines += ["", f"The base model at its own context ({base_length} tokens): ordinary "
                  f"windows {ordinary}, repeat probe {probe}."]
    lines += ["", "Training (each arm's own attention; tokens/s is the median of the logged "
              "intervals, on a shared machine):", "",
              "| N | trained with | trainable parameters | tokens/s | final training loss |",
              "|---:|---|---:|---:|---:|"]
    for n in targets:
        for arm, label in ARMS.items():
            stats = training_stats(os.path.join(work, "logs", f"N{n}_{arm}.log"))
            summary.setdefault("training", {})[f"N{n}_{arm}"] = stats
            rate = stats.get("tokens_per_s")
            loss = stats.get("final_loss")
            lines.append(f"| {n} | {label} | {stats.get('trainable') or '-'} | "
                         f"{f'{rate:,.0f}' if rate else '-'} | "
                         f"{f'{loss:.3f}' if loss is not None else '-'} |")
    everything = {**results, **own}
    return "\n".join(lines), {**summary, "results": {f"N{k[0]}_{k[1]}_{k[2]}": v["ppl"]
                                                    for k, v in everything.items()}}


def plot(work: str, base_length: int, targets, path: str) -> None:
    """Two panels against the target length: ordinary windows, and the repeat probe."""
    results = load_results(work, targets)
    plt = pyplot()
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    styles = [(BASELINE, "base + PI, no training", "grey", ":"),
              ("full", "full attn", "C0", "-"), ("short", "short", "C1", "-"),
              ("s2", "S²-Attn", "C2", "-")]
    for axes, probe in zip(panels, (False, True)):
        for arm, label, color, line in styles:
            for evaluated in (("probe",) if probe else ("dense", "own")):
                points = [(n, results[(n, arm, evaluated)]) for n in targets
                          if (n, arm, evaluated) in results]
                if not points:
                    continue
                ys = [row["ppl"] for _, row in points]
                bounds = [ppl_interval(row["window_losses"]) for _, row in points]
                errors = [[y - lo for y, (lo, _) in zip(ys, bounds)],
                          [hi - y for y, (_, hi) in zip(ys, bounds)]]
                own = evaluated == "own"
                axes.errorbar([n for n, _ in points], ys, yerr=errors, color=color,
                              linestyle="--" if own else line, marker="o", capsize=3,
                              label=f"{label}, eval {label if own else 'dense'}")
        axes.set_xscale("log", base=2)
        axes.set_xticks(list(targets), [f"{n}\n({n // base_length}x)" for n in targets])
        axes.set_xlabel("target length N (G = N/4)")
        axes.set_ylabel("held-out perplexity at N" if not probe
                        else "perplexity of the repeated half")
        axes.set_title("ordinary windows" if not probe
                       else "repeat probe (retrieval from N/2 back, dense)")
        if axes.lines:
            axes.legend(fontsize=8)
    figure.suptitle(f"attention pattern while training; base context {base_length}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", help="the ablation's working directory (eval/ and logs/ inside)")
    parser.add_argument("--base-length", type=int, required=True, help="the base model's context")
    parser.add_argument("--targets", required=True, help="comma-separated target lengths")
    args = parser.parse_args(argv)
    targets = [int(x) for x in args.targets.split(",")]
    table, summary = summarize(args.work, args.base_length, targets)
    with open(os.path.join(args.work, "table.md"), "w") as handle:
        handle.write(table + "\n")
    write_json(os.path.join(args.work, "summary.json"), summary)
    plot(args.work, args.base_length, targets, os.path.join(args.work, "ablation_patterns.png"))
    print(table)


if __name__ == "__main__":
    sys.exit(run_cli(main))
