"""Perplexity reports side by side (the ablation's table and plot):

  megalong-report --json a.json b.json --labels A B [--plot out.png] [--out table.md]
"""

import argparse
import os
import sys

from megalong.errors import MegalongError, run_cli
from megalong.eval.report import plot_ppl, ppl_comparison_markdown, read_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", nargs="+", required=True, help="perplexity reports (eval_ppl --json)")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per report")
    parser.add_argument("--plot", default=None, help="PNG: perplexity vs context length")
    parser.add_argument("--title", default="Perplexity vs context length")
    parser.add_argument("--mark-length", type=int, default=None, help="a vertical line here")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    labels = args.labels or [os.path.splitext(os.path.basename(p))[0] for p in args.json]
    if len(labels) != len(args.json):
        raise MegalongError(f"{len(args.json)} reports but {len(labels)} labels")
    reports = {}
    for label, path in zip(labels, args.json):
        report = read_json(path)
        if report.get("kind") != "perplexity":
            raise MegalongError(f"{path} is not a perplexity report (eval_ppl --json)")
        reports[label] = report
    table = ppl_comparison_markdown(reports)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")
    if args.plot:
        plot_ppl(reports, args.plot, title=args.title, marker_length=args.mark_length)


def console() -> None:
    sys.exit(run_cli(main))
