#!/usr/bin/env bash
""":"
# LongLoRA context extension on megatron-core. Every way in trains on every rank and node:
#   MODEL=llama2-7b SEQ_LEN=32768 LOAD=ckpt/llama2-7b DATA_PATH=data/pg19_text_document \
#   SAVE=runs/7b-32k NPROC_PER_NODE=8 bash examples/pretrain_longlora.sh [trainer flags]
#   torchrun --nnodes 2 --nproc-per-node 8 ... examples/pretrain_longlora.sh [trainer flags]
#   torchrun ... --no-python bash examples/pretrain_longlora.sh [trainer flags]
# Run without torchrun it starts torchrun for this node (NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT, NPROC_PER_NODE); under torchrun it is one rank. The recipes (MODEL, SEQ_LEN, TP,
# PP, CP, batch sizes, ...) are megalong/recipes.py's; `--help` lists the variables and flags.
#
# This file is read by bash and by Python alike (torchrun runs its script with Python): bash
# runs these lines and hands the file to Python, for which they are a string.
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}"
exec "$PYTHON" "$0" "$@"
":"""
import os
import sys

from megalong.cli.launch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.path.abspath(__file__)))
