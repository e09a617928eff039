"""Per-GPU memory and step FLOPs of a megalong training configuration, before launching it.

  plan.py --model llama2-70b --seq-length 32768 --tp 8 [--cp 1] [--pp 1] [--micro-batch-size 1]
          [--recompute full|selective|none [--recompute-layers K]]
          [--lora-rank 8 | --full-finetune] [--bf16] [--sequence-parallel] [--attention s2|full]
          [--gpu-memory-gib 80]
  plan.py --model llama2-70b --seq-length 32768 --bf16 --search 8     layouts of 8 GPUs that fit
  plan.py --table                       the 7B/13B/70B x 8k/32k/100k table of docs/PERF.md

Memory counts weights, LoRA adapters, float32 gradient buffers, Adam state (+ float32 master
weights in bf16), activations under the recompute choice (of which the attention kernels'
workspace) on the busiest rank; FLOPs are model FLOPs (2P forward + 2P input gradient +
2P_trainable weight gradient + attention as computed) and hardware FLOPs (plus what recompute
repeats). The model is megalong/plan.py; docs/PERF.md says how close it comes to measured peaks.
"""

import argparse
import dataclasses
import itertools
import sys

from megalong.config.arch import PRESETS
from megalong.config.job import JobConfig
from megalong.config.model import LOSS_CHUNK_TOKENS
from megalong.errors import MegalongError, run_cli
from megalong.plan import GIB, RECOMPUTE, PlanConfig, memory_breakdown, recompute_flags, step_flops


TABLE_MODELS = ("llama2-7b", "llama2-13b", "llama2-70b")
TABLE_LENGTHS = (8192, 32768, 100000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="full",
                        help="activation recompute, as --recompute-granularity (none: off)")
    parser.add_argument("--recompute-layers", type=int, default=None, metavar="K",
                        help="with --recompute full: recompute only the first K layers of each "
                             "pipeline stage (pretrain's --recompute-method block "
                             "--recompute-num-layers K); default every layer")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--full-finetune", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights and activations")
    parser.add_argument("--attention", choices=["s2", "full"], default="s2")
    parser.add_argument("--group-size-ratio", type=float, default=0.25)
    parser.add_argument("--loss-chunk-tokens", type=int, default=LOSS_CHUNK_TOKENS,
                        help="as pretrain_longlora's flag: tokens per lm_head + loss chunk "
                             "(0: whole logits)")
    parser.add_argument("--cpu", action="store_true",
                        help="a CPU run (no fused SwiGLU / cross entropy, as megalong on CPU)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU, for the fits / does-not-fit verdict")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of the GPU kept free for what the plan does not count "
                             "(CUDA context, NCCL buffers, allocator fragmentation; the plan comes "
                             "1-10%% under measured peaks): a layout fits when its total is at "
                             "most (1 - headroom) x --gpu-memory-gib (default 0.1)")
    parser.add_argument("--search", type=int, metavar="GPUS", default=None,
                        help="list the tp x cp x pp layouts of GPUS GPUs and recompute choices "
                             "(none, selective, full, block of 1/4, 1/2, 3/4 of a stage's "
                             "layers), those that fit first, cheapest "
                             "(least recompute FLOPs, then fewer pipeline stages, then memory) "
                             "first")
    parser.add_argument("--table", action="store_true",
                        help="print the 7B/13B/70B x 8k/32k/100k table (8 GPUs, bf16, LoRA+)")
    return parser


def job_from_args(args) -> JobConfig:
    """The training job these flags describe, under training's flag names (--tp is
    --tensor-model-parallel-size, --recompute full --recompute-layers K is --recompute-granularity
    full --recompute-method block --recompute-num-layers K, ...)."""
    return JobConfig().with_flags(
        seq_length=args.seq_length, attention=args.attention,
        group_size_ratio=args.group_size_ratio,
        tensor_model_parallel_size=args.tp, context_parallel_size=args.cp,
        pipeline_model_parallel_size=args.pp, sequence_parallel=args.sequence_parallel,
        micro_batch_size=args.micro_batch_size, bf16=args.bf16,
        loss_chunk_tokens=args.loss_chunk_tokens,
        **recompute_flags(args.recompute, args.recompute_layers),
        lora_rank=args.lora_rank, full_finetune=args.full_finetune)


def config_from_args(args, **flags) -> PlanConfig:
    """The plan of these flags' job, `flags` (the job's setting names) changing it."""
    return PlanConfig(PRESETS[args.model], job_from_args(args).with_flags(**flags),
                      gpu=not args.cpu)


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def usable_bytes(args) -> float:
    return (1.0 - args.headroom) * args.gpu_memory_gib * GIB


def describe(cfg: PlanConfig, args) -> str:
    gpu_gib = args.gpu_memory_gib
    mem = memory_breakdown(cfg)
    flops = step_flops(cfg)
    parallel, training, lora = cfg.parallel, cfg.training, cfg.lora
    layout = (f"{_layout(cfg)}{' SP' if parallel.sequence_parallel else ''}, "
              f"micro-batch {training.micro_batch_size}, {'bf16' if training.bf16 else 'fp32'}, "
              f"{'full fine-tuning' if lora.full_finetune else f'LoRA+ r={lora.lora_rank}'}, "
              f"{'S²-Attn G=' + str(cfg.group_size) if cfg.model.attention == 's2' else 'dense attention'}, "
              f"recompute {cfg.recompute_label}")
    rows = [("weights", mem["weights"]), ("LoRA adapters", mem["adapters"]),
            ("gradients (fp32 buffer)", mem["gradients"]),
            ("optimizer state (Adam" + (" + fp32 master)" if training.bf16 else ")"),
             mem["optimizer"]),
            (f"activations (recompute {cfg.recompute_label})", mem["activations"]),
            ("  of which attention workspace", mem["attention_workspace"]),
            ("**total per GPU**", mem["total"])]
    verdict = "fits" if mem["total"] <= usable_bytes(args) else "does NOT fit"
    lines = [f"{cfg.arch.num_layers}-layer model, N = {cfg.seq_length}: {layout}", "",
             "| per GPU | GiB |", "|---|---:|"]
    lines += [f"| {name} | {_gib(value)} |" for name, value in rows]
    lines += ["", f"{verdict} in {gpu_gib:g} GiB (at most {_gib(usable_bytes(args))} GiB planned: "
                  f"{100 * args.headroom:g} % headroom)", "",
              "| FLOPs per micro-batch step | TFLOP |", "|---|---:|",
              f"| model (2P fwd + 2P input grad + 2P_trainable weight grad + attention) "
              f"| {flops['model'] / 1e12:,.1f} |",
              f"| of which attention | {flops['attention'] / 1e12:,.1f} |",
              f"| hardware (model + recompute) | {flops['hardware'] / 1e12:,.1f} |",
              f"| model, per GPU | {flops['per_gpu_model'] / 1e12:,.1f} |"]
    return "\n".join(lines)


def layouts(args, gpus: int):
    """(config, memory) for every tp x cp x pp = gpus and recompute choice that validates:
    none, selective, full, and block recompute of a quarter, half and three quarters of a
    stage's layers."""
    found = []
    for tp, cp, pp in itertools.product(_divisors(gpus), repeat=3):
        if tp * cp * pp != gpus:
            continue
        try:  # PlanConfig refuses a tp, cp or pp that does not divide the model
            base = config_from_args(args, tensor_model_parallel_size=tp,
                                    context_parallel_size=cp, pipeline_model_parallel_size=pp,
                                    sequence_parallel=tp > 1, **recompute_flags("none"))
        except MegalongError:
            continue
        if base.model.attention == "s2" and (base.seq_length // cp) % (base.group_size // 2):
            continue  # a CP slice must be a multiple of G/2 (DESIGN.md §6)
        blocks = sorted({base.stage_layers * q // 4 for q in (1, 2, 3)} - {0})
        choices = [(r, None) for r in RECOMPUTE] + [("full", k) for k in blocks]
        for recompute, block in choices:
            cfg = dataclasses.replace(base, job=base.job.with_flags(
                **recompute_flags(recompute, block)))
            found.append((cfg, memory_breakdown(cfg)["total"]))
    return found


def _layout(cfg: PlanConfig) -> str:
    parallel = cfg.parallel
    return (f"TP={parallel.tensor_model_parallel_size} CP={parallel.context_parallel_size} "
            f"PP={parallel.pipeline_model_parallel_size}")


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def _recompute_flops(cfg: PlanConfig) -> float:
    """What recompute adds to a step: the cost that orders layouts before memory does."""
    flops = step_flops(cfg)
    return flops["hardware"] - flops["model"]


def search(args, gpus: int) -> str:
    rows = layouts(args, gpus)
    limit = usable_bytes(args)
    rows.sort(key=lambda r: (r[1] > limit, _recompute_flops(r[0]),
                             r[0].parallel.pipeline_model_parallel_size, r[1]))
    lines = [f"{args.model}, N = {args.seq_length}, {gpus} GPUs of {args.gpu_memory_gib:g} GiB, "
             f"at most {_gib(limit)} GiB planned (SP with TP > 1; cheapest first: least "
             f"recompute FLOPs, then fewer pipeline stages, then memory)", "",
             "| TP | CP | PP | recompute | GiB per GPU | fits |",
             "|---:|---:|---:|---|---:|---|"]
    for cfg, total in rows:
        parallel = cfg.parallel
        lines.append(f"| {parallel.tensor_model_parallel_size} | {parallel.context_parallel_size} "
                     f"| {parallel.pipeline_model_parallel_size} | {cfg.recompute_label} "
                     f"| {_gib(total)} | {'yes' if total <= limit else 'no'} |")
    return "\n".join(lines)


def table(args) -> str:
    """Per (model, N): the cheapest layout of 8 GPUs that fits in --gpu-memory-gib."""
    limit = usable_bytes(args)
    lines = ["| model | N | cheapest layout on 8 GPUs (SP with TP > 1) | recompute | GiB per GPU "
             "| TP=8 SP, full recompute: GiB per GPU | model TFLOP per sequence |",
             "|---|---:|---|---|---:|---:|---:|"]
    for model, length in itertools.product(TABLE_MODELS, TABLE_LENGTHS):
        args.model, args.seq_length = model, length
        rows = [r for r in layouts(args, 8) if r[1] <= limit]
        rows.sort(key=lambda r: (_recompute_flops(r[0]),
                                 r[0].parallel.pipeline_model_parallel_size, r[1]))
        tp8 = config_from_args(args, tensor_model_parallel_size=8, context_parallel_size=1,
                               pipeline_model_parallel_size=1, sequence_parallel=True,
                               **recompute_flags("full", args.recompute_layers))
        flops = step_flops(tp8)["model"] / 1e12
        if rows:
            cfg, total = rows[0]
            best = f"{_layout(cfg)} | {cfg.recompute_label} | {_gib(total)}"
        else:
            best = "none fits | – | –"
        lines.append(f"| {model} | {length:,} | {best} | {_gib(memory_breakdown(tp8)['total'])} "
                     f"| {flops:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 <= args.headroom < 1:  # --table plans with it too
        raise MegalongError(f"--headroom must be in [0, 1), got {args.headroom}")
    if args.table:
        args.bf16 = True
        print(table(args))
        return
    if args.model is None or args.seq_length is None:
        raise MegalongError("give --model and --seq-length (or --table)")
    if args.search:
        print(search(args, args.search))
        return
    print(describe(config_from_args(args), args))


def console() -> None:
    sys.exit(run_cli(main))
