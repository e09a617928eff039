"""Reports of the eval tools: JSON files, Markdown tables, and matplotlib plots (Agg backend).
`megalong-report` (cli/report.py) puts several perplexity reports side by side."""

import json
import math
import os
from typing import Optional

from megalong.atomic import atomic_file
from megalong.data.files import make_dirs
from megalong.records import read_json as _read_json


def write_json(path: str, report: dict) -> None:
    """Atomically (a temp sibling renamed into place)."""
    make_dirs(os.path.dirname(os.path.abspath(path)))
    with atomic_file(path) as staging, open(staging, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")


def read_json(path: str) -> dict:
    return _read_json(path, missing=f"report {path} does not exist")


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- perplexity


def ppl_markdown(report: dict) -> str:
    rows = ["| seq length | windows | predictions | mean loss | perplexity |", "|---:|---:|---:|---:|---:|"]
    for row in report["results"]:
        length = f"{row['seq_length']} (repeat probe)" if row.get("probe") else row["seq_length"]
        rows.append(f"| {length} | {row['windows']} | {row['predictions']} | "
                    f"{row['loss']:.4f} | {_number(row['ppl'], 5)} |")
    return "\n".join(rows)


def _ordinary(report: dict) -> dict:
    """The report without its repeat-probe rows (tables and plots side by side compare the
    ordinary windows)."""
    return {**report, "results": [r for r in report["results"] if not r.get("probe")]}


def ppl_comparison_markdown(reports: dict) -> str:
    """{label: perplexity report} -> one row per label, one column per seq length."""
    reports = {label: _ordinary(rep) for label, rep in reports.items()}
    lengths = sorted({r["seq_length"] for rep in reports.values() for r in rep["results"]})
    rows = ["| model | " + " | ".join(f"ppl @ {n}" for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths)]
    for label, rep in reports.items():
        by_length = {r["seq_length"]: r["ppl"] for r in rep["results"]}
        rows.append(f"| {label} | " + " | ".join(_number(by_length.get(n), 5) for n in lengths) + " |")
    return "\n".join(rows)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(reports: dict, path: str, *, title: str = "Perplexity vs context length",
             marker_length: Optional[int] = None) -> None:
    """{label: perplexity report} -> perplexity (log scale) against seq length (log2 scale)."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    values, lengths = [], set()
    for label, rep in reports.items():
        rows = sorted(_ordinary(rep)["results"], key=lambda r: r["seq_length"])
        lengths.update(r["seq_length"] for r in rows)
        values += [r["ppl"] for r in rows if math.isfinite(r["ppl"])]
        axes.plot([r["seq_length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=label)
    if marker_length:
        axes.axvline(marker_length, color="grey", linestyle=":", linewidth=1)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    axes.xaxis.set_minor_formatter(NullFormatter())
    if values and max(values) / max(min(values), 1e-12) > 3:  # wide range: log scale
        axes.set_yscale("log")
        plain = FuncFormatter(lambda value, _position: f"{value:g}")
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
    axes.set_xlabel("evaluation context length (tokens)")
    axes.set_ylabel("perplexity (dense attention)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


def _save(figure, path: str) -> None:
    make_dirs(os.path.dirname(os.path.abspath(path)))
    with atomic_file(path, suffix=".png") as staging:  # matplotlib picks the format by suffix
        figure.savefig(staging)


# ---------------------------------------------------------------- passkey


def passkey_markdown(report: dict) -> str:
    lengths, depths = report["lengths"], report["depths"]
    lines = ["| prompt length | trials | accuracy |", "|---:|---:|---:|"]
    for length in lengths:
        trials = report["trials"] * len(depths)
        lines.append(f"| {length} | {trials} | {_number(report['accuracy_by_length'][str(length)], 3)} |")
    lines += ["", "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
              "|---:|" + "---:|" * len(lengths)]
    for depth, row in zip(depths, report["grid"]):
        lines.append(f"| {depth:g} | " + " | ".join(_number(a, 3) for a in row) + " |")
    return "\n".join(lines)


def plot_passkey(report: dict, path: str, *, title: str = "Passkey retrieval accuracy") -> None:
    """Depth x length heat map of accuracy."""
    import numpy as np

    plt = pyplot()
    grid = np.array([[np.nan if a is None else a for a in row] for row in report["grid"]], dtype=float)
    lengths, depths = report["lengths"], report["depths"]
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)), dpi=100)
    image = axes.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    axes.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    axes.set_xlabel("prompt length (tokens)")
    axes.set_ylabel("key depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                axes.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axes, label="accuracy")
    axes.set_title(title)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


# ---------------------------------------------------------------- generation


def generation_markdown(report: dict) -> str:
    lines = ["| # | prompt tokens | new tokens | seconds | completion |", "|---:|---:|---:|---:|---|"]
    for i, row in enumerate(report["outputs"]):
        text = row["completion"].replace("\n", "\\n").replace("|", "\\|")
        text = text if len(text) <= 80 else text[:77] + "..."
        lines.append(f"| {i} | {row['prompt_tokens']} | {len(row['tokens'])} | "
                     f"{row['seconds']:.2f} | {text} |")
    return "\n".join(lines)
