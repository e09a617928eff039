"""Long-context perplexity, as LongLoRA's eval defines it: windows of seq-length tokens every
--stride tokens, PPL = exp(mean over windows of each window's mean token loss). Dense attention
unless --eval-attention asks for a training pattern. Any TP/PP: under torchrun the launched
ranks are used, otherwise TP x PP local ranks are spawned.

  eval_ppl.py --load CKPT | --hf-dir DIR  --data PREFIX|tokens.bin  --seq-lengths 2048,4096
              [--stride 256] [--max-windows K] [--eval-attention full|s2|short]
              [--json OUT] [--plot OUT.png]

--data: a megatron IndexedDataset prefix (documents concatenated) or a flat token file (uint16,
uint32 for vocabularies over 65536; LongLoRA's PG19/proof-pile format). Prints a Markdown table.
"""

import argparse
import os
import sys

from megalong.cli import model_args
from megalong.config.model import GROUPED_PATTERNS, EvalAttention
from megalong.errors import MegalongError, run_cli
from megalong.eval.data import check_windows_fit, open_eval_tokens
from megalong.eval.report import plot_ppl, ppl_markdown, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args.add_model_args(parser)
    data = parser.add_argument_group("data and windows")
    data.add_argument("--data", required=True, help="IndexedDataset prefix or flat token file")
    data.add_argument("--data-dtype", choices=["uint16", "uint32", "int32"], default=None,
                      help="dtype of a flat token file (default uint16; uint32 when the vocabulary "
                           "exceeds 65536)")
    data.add_argument("--seq-lengths", type=model_args.number_list(int), required=True,
                      help="comma-separated evaluation lengths, e.g. 2048,4096,8192")
    data.add_argument("--stride", type=int, default=256, help="tokens between window starts (256)")
    data.add_argument("--max-windows", type=int, default=None,
                      help="evaluate at most K windows per length, spread evenly over the data")
    data.add_argument("--micro-batch-size", type=int, default=1, help="windows per forward pass")
    data.add_argument("--repeat-probe", action="store_true",
                      help="also a copy test of the long context at each length: each window's "
                           "first half followed by itself, perplexity of the second copy only "
                           "(predicting it well takes attention seq-length/2 tokens back); "
                           "lengths must be even")
    attention = parser.add_argument_group("attention")
    attention.add_argument("--eval-attention", choices=("full", *GROUPED_PATTERNS), default="full",
                           help="full: dense causal attention, as the model is deployed "
                                "(default); s2: S²-Attn, as in training, the paper's 'tested with "
                                "S²-Attn'; short: groups without the shift (ablation only)")
    attention.add_argument("--group-size-ratio", type=float, default=None,
                           help="with --eval-attention s2/short: group size as a fraction of each "
                                "evaluated length (default 0.25)")
    attention.add_argument("--group-size", type=int, default=None,
                           help="with --eval-attention s2/short: group size in tokens for every "
                                "length (overrides --group-size-ratio)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    out.add_argument("--plot", default=None, metavar="OUT.png", help="plot perplexity vs length")
    out.add_argument("--label", default=None, help="name of the model in the plot legend")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def eval_attention(args) -> EvalAttention:
    ratio = 0.25 if args.group_size_ratio is None else args.group_size_ratio
    return EvalAttention(pattern=args.eval_attention, group_size=args.group_size,
                         group_size_ratio=ratio)


def validate(args):
    """Every check that needs no torch; returns the model source."""
    for name in ("stride", "max_windows", "micro_batch_size"):
        model_args.check_positive(name.replace("_", "-"), getattr(args, name))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        model_args.check_positive(name.replace("_", "-"), getattr(args, name))
    bad = [n for n in args.seq_lengths if n < 2]
    if bad:
        raise MegalongError(f"--seq-lengths must be >= 2, got {bad}")
    if args.eval_attention == "full" and (args.group_size, args.group_size_ratio) != (None, None):
        raise MegalongError("--group-size/--group-size-ratio apply to --eval-attention s2 or "
                            "short only")
    eval_attention(args).validate(args.seq_lengths)
    odd = [n for n in args.seq_lengths if n % 2]
    if args.repeat_probe and odd:
        raise MegalongError(f"--repeat-probe needs even --seq-lengths, got {odd}")
    source = model_args.source_from_args(args)
    data = open_eval_tokens(args.data, vocab_size=source.arch.vocab_size, dtype=args.data_dtype)
    check_windows_fit(len(data), args.seq_lengths, args.stride)
    model_args.check_output_file("json", args.json)
    model_args.check_output_file("plot", args.plot)
    return source


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    source = validate(args)
    from megalong.eval.runs import eval_ppl_on_ranks, run_on_model_ranks  # torch from here on

    report = run_on_model_ranks(
        source, eval_ppl_on_ranks, source, args.data, args.seq_lengths, args.stride,
        args.max_windows, args.micro_batch_size, args.data_dtype, not args.quiet,
        eval_attention(args), args.repeat_probe)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(ppl_markdown(report))
    if args.json:
        write_json(args.json, report)
    if args.plot:
        label = args.label or os.path.basename(os.path.normpath(source.path))
        plot_ppl({label: report}, args.plot)


def console() -> None:
    sys.exit(run_cli(main))
