#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): correctness, then performance, as Markdown tables
# printed and written under OUT_DIR (correctness.md, perf.md). Each part takes a few minutes.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--part correctness|perf|all] [--dry-run]
#
# A bare lent GPU machine (Python 3.12, torch 2.11, transformers, peft, pytest) lacks
# megatron-core and may lack psutil (megatron's checkpoint writer): put their wheels in .whl/ and
# carry it (carry [".whl"]); every wheel there is installed into /tmp/site. Fetch them once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       megatron-core==0.16.1 psutil
# (megatron-core ~3 MiB, psutil < 1 MiB; neither Transformer Engine, 276 MB, nor flash-attn, a
# source build, can be carried: the check lists them as not checked.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--part correctness|perf|all] [--dry-run]}
shift
PY=${PYTHON:-python3}
dry_run=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=1; done
if [ "$dry_run" = 0 ] && ! $PY -c "import megatron.core, psutil" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [ "$dry_run" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
exec $PY benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
