"""Launch recipes: the trainer flags for a model and target length, from the launcher's
environment variables (torch-free). The one place the launcher's defaults live, whether it is
started with bash, torchrun or Slurm (examples/pretrain_longlora.sh, megalong/cli/launch.py).

LongLoRA's setups on 8 x 80 GB nodes, LoRA+ with S²-Attn (G = N/4), bf16, full recompute:
  llama2-7b  32k : TP=2 with sequence parallel, DP=4
  llama2-7b 100k : TP=8 with sequence parallel (beyond 64k the activations need the whole node)
  llama2-13b 32k : TP=4 with sequence parallel
  llama2-70b 32k : TP=8 with sequence parallel; PP = NNODES across nodes
  mistral-7b, qwen2.5-7b, qwen3-8b: as llama2-7b, TP capped at the largest size dividing the
                   heads (Qwen2.5-7B: 28 heads / 4 kv heads, so TP=4 beyond 64k)
  tiny           : CPU demo and tests (gloo), float32, no recompute
"""

from typing import Mapping

from megalong.config.arch import PRESETS, validate_tp
from megalong.errors import MegalongError


SEVEN_B = ("llama2-7b", "mistral-7b", "qwen2.5-7b", "qwen3-8b")  # llama2-7b's recipe
RECIPE_MODELS = (*SEVEN_B, "llama2-13b", "llama2-70b", "tiny")

# Environment variable -> (what it sets, default), for the launcher's usage text.
ENVIRONMENT = {
    "MODEL": ("recipe; the architecture itself comes from LOAD when given", "llama2-7b"),
    "SEQ_LEN": ("target context length", "32768"),
    "LOAD": ("converted checkpoint (tools/checkpoint_convert.py hf-to-megatron)", "none"),
    "DATA_PATH": ("IndexedDataset prefix(es) from tools/preprocess_data.py", "required"),
    "SAVE": ("checkpoint directory", "runs/$MODEL-$SEQ_LEN"),
    "TP, PP, CP": ("parallel sizes", "from the recipe"),
    "MICRO_BATCH, GLOBAL_BATCH": ("sequences per pass and per step", "1, 64"),
    "TRAIN_ITERS, LR, SAVE_INTERVAL": ("steps, peak learning rate, steps between saves",
                                       "1000, 2e-5, 100"),
    "NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE": (
        "torchrun's rendezvous when the launcher starts it", "1, 0, 127.0.0.1, 29500, GPUs or 1"),
    "PYTHON": ("the interpreter (bash entry only)", "python3, or .venv/bin/python when present"),
}


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name) or str(default)
    try:
        return int(value)
    except ValueError:
        raise MegalongError(f"{name}={value} is not a whole number") from None


def parallel_flags(model: str, seq_length: int, env: Mapping[str, str]) -> list:
    """TP/PP (and SP, bf16, recompute, distributed optimizer) of a recipe."""
    if model in SEVEN_B:
        tp, pp = _int(env, "TP", _dividing_tp(model, 8 if seq_length > 65536 else 2)), _int(env, "PP", 1)
    elif model == "llama2-13b":
        tp, pp = _int(env, "TP", 4), _int(env, "PP", 1)
    elif model == "llama2-70b":
        tp, pp = _int(env, "TP", 8), _int(env, "PP", _int(env, "NNODES", 1))
    elif model == "tiny":
        tp, pp = _int(env, "TP", 1), _int(env, "PP", 1)
    else:
        raise MegalongError(f"unknown MODEL={model} ({', '.join(RECIPE_MODELS)})")
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if model != "tiny":
        flags += ["--bf16", "--recompute-granularity", "full", "--use-distributed-optimizer"]
        if tp > 1:  # sequence parallel shards activations over the TP ranks
            flags.append("--sequence-parallel")
    return flags


def _dividing_tp(model: str, wanted: int) -> int:
    """The largest TP size <= wanted that splits the model's heads, kv heads and MLP."""
    for tp in range(wanted, 1, -1):
        try:
            validate_tp(PRESETS[model], tp, 1)
            return tp
        except MegalongError:
            continue
    return 1


def recipe_argv(env: Mapping[str, str]) -> list:
    """The trainer's flags for the launcher's environment; flags given on the command line are
    appended after these, so they win (argparse keeps the last)."""
    model = env.get("MODEL") or "llama2-7b"
    seq_length = _int(env, "SEQ_LEN", 32768)
    source = ["--load", env["LOAD"]] if env.get("LOAD") else ["--model", model]
    argv = source + [
        "--seq-length", str(seq_length), "--attention", "s2", "--group-size-ratio", "0.25",
        "--micro-batch-size", str(_int(env, "MICRO_BATCH", 1)),
        "--global-batch-size", str(_int(env, "GLOBAL_BATCH", 64)),
        "--train-iters", str(_int(env, "TRAIN_ITERS", 1000)), "--lr", env.get("LR") or "2e-5",
        "--lr-warmup-iters", "20", "--lr-decay-style", "constant", "--weight-decay", "0.0",
        "--save", env.get("SAVE") or f"runs/{model}-{seq_length}",
        "--save-interval", str(_int(env, "SAVE_INTERVAL", 100)), "--exit-signal-handler",
    ] + parallel_flags(model, seq_length, env)
    if env.get("CP"):
        argv += ["--context-parallel-size", str(_int(env, "CP", 1))]
    if env.get("DATA_PATH"):
        argv += ["--data-path", *env["DATA_PATH"].split()]  # 'W1 P1 W2 P2' blends as Megatron-LM
    return argv


def usage() -> str:
    rows = [f"  {name}\n      {meaning} [{default}]" for name, (meaning, default)
            in ENVIRONMENT.items()]
    return "Environment (defaults in brackets):\n" + "\n".join(rows) + "\n\n" + \
        __doc__.split("\n\n", 1)[1]
