#!/usr/bin/env bash
# The CPU demo, end to end (a few minutes on 2 cores):
#   1. a Llama-style sentencepiece tokenizer and a corpus from text every Python install has;
#   2. a small random Llama (HF format) converted to a megatron-core checkpoint at TP=2, with
#      RoPE interpolation for 4x its original 256-token context;
#   3. LongLoRA training at 1024 tokens: S²-Attn (G = 256) + LoRA+ (adapters on q,k,v,o plus
#      trainable embedding and norms), with validation;
#   4. export: merged HF model + a PEFT adapter, and a summary table.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source "$root/examples/_env.sh"
megalong_env
work="${MEGALONG_QUICKSTART_DIR:-$root/runs/quickstart}"
iters="${QUICKSTART_ITERS:-30}"
rm -rf "$work" && mkdir -p "$work"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
step() { echo; echo "== $*" >&2; }

step "1. tokenizer and corpus (Python's own standard library sources)"
"$PY" -m megalong.data.demo_text "$work/corpus.jsonl" --source stdlib --max-mb 2
"$PY" tools/train_tokenizer.py --input "$work/corpus.jsonl" --vocab-size 1000 --out "$work/tokenizer"
"$PY" tools/preprocess_data.py --input "$work/corpus.jsonl" --tokenizer "$work/tokenizer/tokenizer.model" \
    --output-prefix "$work/data/corpus" --workers 2

step "2. a small random Llama, converted at TP=2 for a 1024-token target"
"$PY" tools/make_random_model.py --model tiny --vocab-size 1000 --out "$work/hf_base"
cp "$work/tokenizer/tokenizer.model" "$work/hf_base/"
"$PY" tools/checkpoint_convert.py hf-to-megatron --hf-dir "$work/hf_base" --out "$work/base" \
    --tp 2 --seq-length 1024

step "3. LongLoRA training: S²-Attn + LoRA+, 2 gloo ranks (TP=2), $iters steps"
MODEL=tiny SEQ_LEN=1024 NPROC_PER_NODE=2 MASTER_PORT="${MASTER_PORT:-29517}" PYTHON="$PY" \
bash examples/pretrain_longlora.sh \
    --load "$work/base" --data-path "$work/data/corpus" --tensor-model-parallel-size 2 \
    --micro-batch-size 1 --global-batch-size 2 --train-iters "$iters" --lr 3e-3 \
    --lr-warmup-iters 5 --eval-interval "$iters" --eval-iters 2 --save "$work/run" \
    --save-interval "$iters" --log-interval 5 2>&1 | tee "$work/train.log" | grep -v -i warn

step "4. export: merged HF model and a PEFT adapter"
"$PY" tools/checkpoint_convert.py megatron-to-hf --load "$work/run" --out "$work/hf_extended" \
    --merge-lora --peft-adapter "$work/peft_adapter"

"$PY" - "$work" <<'PY'
import json, re, sys
work = sys.argv[1]
log = open(f"{work}/train.log").read()
losses = [float(x) for x in re.findall(r"iter \d+/\d+ \| loss ([0-9.]+)", log)]
valid = re.findall(r"validation at iter (\d+) \| loss ([0-9.]+)", log)
speed = re.findall(r"\| ([0-9,]+) tok/s", log)
config = json.load(open(f"{work}/hf_extended/config.json"))
print("\n| quickstart result | value |\n|---|---|")
print(f"| training loss, first -> last logged step | {losses[0]:.3f} -> {losses[-1]:.3f} |")
if valid:
    print(f"| validation loss at step {valid[-1][0]} | {float(valid[-1][1]):.3f} |")
print(f"| throughput (last logged step) | {speed[-1]} tokens/s |")
print(f"| exported context | max_position_embeddings {config['max_position_embeddings']} x "
      f"rope_scaling {config['rope_scaling']['factor']:g} ({config['rope_scaling']['type']}) |")
print(f"| outputs | {work}/hf_extended (merged HF), {work}/peft_adapter (PEFT) |")
PY
