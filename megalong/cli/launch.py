"""The training launcher behind examples/pretrain_longlora.sh: under torchrun (LOCAL_RANK or
TORCHELASTIC_RUN_ID set) it is one rank and trains; otherwise it starts torchrun for this node,
with itself as every rank's script. Flags come from the recipe (recipes.py) for the
environment's MODEL and SEQ_LEN, then from the command line (which wins)."""

import os
import shutil
import subprocess
import sys

from megalong.cli.train import main as train_main
from megalong.errors import run_cli
from megalong.recipes import recipe_argv, usage


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def _gpus_on_this_node() -> int:
    """nvidia-smi's count (torch is not imported before torchrun starts the ranks), at least 1."""
    if shutil.which("nvidia-smi") is None:
        return 1
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return 1
    return max(1, sum(line.startswith("GPU ") for line in listing.stdout.splitlines()))


def torchrun_command(script: str, argv: list) -> list:
    env = os.environ
    return [sys.executable, "-m", "torch.distributed.run",
            "--nnodes", env.get("NNODES") or "1", "--node-rank", env.get("NODE_RANK") or "0",
            "--master-addr", env.get("MASTER_ADDR") or "127.0.0.1",
            "--master-port", env.get("MASTER_PORT") or "29500",
            "--nproc-per-node", env.get("NPROC_PER_NODE") or str(_gpus_on_this_node()),
            script, *argv]


def main(argv: list, script: str) -> int:
    if "-h" in argv or "--help" in argv:
        if not under_torchrun() or os.environ.get("RANK", "0") == "0":
            print(f"usage: [ENV=...] bash {script} [trainer flags]\n"
                  f"       torchrun [torchrun flags] {script} [trainer flags]\n\n{__doc__}\n\n"
                  f"{usage()}\nTrainer flags:", flush=True)
            run_cli(train_main, ["--help"])
        return 0
    # Checked here once, not on every rank: an unknown MODEL or a malformed number.
    code = run_cli(lambda _: recipe_argv(os.environ))
    if code:
        return code
    if not under_torchrun():
        command = torchrun_command(script, argv)
        os.execv(command[0], command)
    # megatron overlaps TP communication with compute only when kernels queue on one CUDA
    # connection; set before CUDA starts.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return run_cli(train_main, recipe_argv(os.environ) + argv)
