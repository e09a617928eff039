#!/usr/bin/env bash
# CPU demo, end to end: set up the environment, make a tiny random Llama as an HF checkpoint,
# convert it to a megatron-core checkpoint at TP=2 (two gloo ranks), export it back to HF and
# check the round trip tensor by tensor. (Training joins this demo with the Training issue.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source "$root/examples/_env.sh"
megalong_env
work="${MEGALONG_QUICKSTART_DIR:-$root/runs/quickstart}"
rm -rf "$work" && mkdir -p "$work"
set -x
"$PY" tools/make_random_model.py --model tiny --out "$work/hf"
"$PY" tools/checkpoint_convert.py hf-to-megatron --hf-dir "$work/hf" --out "$work/megatron" --tp 2 --seq-length 2048
"$PY" tools/checkpoint_convert.py megatron-to-hf --load "$work/megatron" --out "$work/hf_export"
{ set +x; } 2>/dev/null
"$PY" tools/checkpoint_convert.py compare --a "$work/hf" --b "$work/hf_export" | tail -n 12
echo "rope scaling recorded in the export: $(grep -A3 '"rope_scaling"' "$work/hf_export/config.json" | tr -d ' \n')"
