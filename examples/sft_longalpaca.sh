#!/usr/bin/env bash
# LongLoRA's supervised fine-tuning (supervised-fine-tune.py, run as its README does) on megalong:
# LongAlpaca json -> S²-Attn + LoRA+ SFT of an extended checkpoint, loss on the answers only.
#   LOAD=$WORK/runs/llama2-7b-32k SFT_DATA=$WORK/text/LongAlpaca-12k.json SEQ_LEN=32768 \
#   SAVE=$WORK/runs/longalpaca-7b-32k bash examples/sft_longalpaca.sh [trainer flags]
# It checks its inputs (torch-free), counts the steps, and hands over to the launcher,
# examples/pretrain_longlora.sh (torchrun for this node, the recipe's parallel layout).
# `--help` lists the variables.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}"

usage() {
    cat <<'EOF'
usage: [ENV=...] bash examples/sft_longalpaca.sh [trainer flags]

Environment (defaults in brackets; LongLoRA's SFT settings unless said):
  LOAD          the extended megalong checkpoint: context-extension training's SAVE, or a model
                converted with tools/checkpoint_convert.py hf-to-megatron --seq-length N [required]
  SFT_DATA      LongAlpaca json or jsonl: records {instruction, input, output} [required]
  TOKENIZER     sentencepiece tokenizer.model or HF tokenizer directory [$LOAD/tokenizer]
  SAVE          checkpoint directory; when it holds a checkpoint the run resumes from it
                [runs/sft-$MODEL-$SEQ_LEN]
  MODEL         recipe for the parallel layout (examples/pretrain_longlora.sh --help) [llama2-7b]
  SEQ_LEN       samples are cut to this many tokens (model_max_length) [16384]
  EPOCHS        passes over SFT_DATA (num_train_epochs) [5]
  GLOBAL_BATCH  samples per step: LongLoRA's 1 per GPU x 8 accumulation x 8 GPUs [64]
  TRAIN_ITERS   steps [ceil(records x EPOCHS / GLOBAL_BATCH)]
  SAVE_INTERVAL steps between checkpoints [one epoch: ceil(records / GLOBAL_BATCH)]
  SHUFFLE       1: train on a copy of SFT_DATA in a seeded random order, $SAVE/sft_data.json
                (megalong reads SFT records in file order); 0: file order [1]
  SEED          the shuffle's and the trainer's seed [1234]
  LR, MICRO_BATCH, TP, PP, CP, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, PYTHON
                as for examples/pretrain_longlora.sh [LR 2e-5, MICRO_BATCH 1]
Fixed: --finetune (only the weights come from LOAD), --adam-beta2 0.999 (HF's AdamW), and the
recipe's 20 warm-up steps, constant LR, weight decay 0, S²-Attn G = SEQ_LEN/4, LoRA+ r=8.
Trainer flags given here come last and win; `bash examples/pretrain_longlora.sh --help` lists them.
EOF
}
for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then usage; exit 0; fi
done

# Missing inputs fail here, before torchrun and torch start.
if [[ -z "${LOAD:-}" ]]; then
    echo "error: LOAD is not set: give the extended checkpoint to fine-tune (see --help)" >&2
    exit 2
fi
if [[ -z "${SFT_DATA:-}" ]]; then
    echo "error: SFT_DATA is not set: give the LongAlpaca json (see --help)" >&2
    exit 2
fi
MODEL="${MODEL:-llama2-7b}" SEQ_LEN="${SEQ_LEN:-16384}" SEED="${SEED:-1234}"
SAVE="${SAVE:-runs/sft-$MODEL-$SEQ_LEN}"
if [[ ! -d "$LOAD" ]]; then
    echo "error: LOAD $LOAD is not a directory: give a megalong checkpoint (see --help)" >&2
    exit 2
fi
if [[ "$(realpath -m "$SAVE")" == "$(realpath -m "$LOAD")" ]]; then
    echo "error: SAVE is LOAD ($LOAD): give the fine-tuned model a directory of its own" >&2
    exit 2
fi
TOKENIZER="${TOKENIZER:-$LOAD/tokenizer}"
if [[ ! -e "$TOKENIZER" ]]; then
    echo "error: tokenizer $TOKENIZER does not exist: set TOKENIZER (the model's tokenizer)" >&2
    exit 2
fi

# A rerun with the same SAVE continues the run (optimizer, schedule, data position); otherwise
# only the weights (and adapters) come from LOAD, and the step count starts at 0.
load="$LOAD" finetune=(--finetune)
if [[ -f "$SAVE/latest_checkpointed_iteration.txt" ]]; then
    load="$SAVE" finetune=()
    echo "[sft] $SAVE holds a checkpoint: resuming from it" >&2
fi

# Torch-free: LOAD is a checkpoint and every record is well formed; the steps for EPOCHS; the
# shuffled copy (the trainer takes consecutive records for each global batch).
plan=$("$PYTHON" -m megalong.cli.sft_plan "$load" "$SFT_DATA" "$SAVE/sft_data.json" \
    "${EPOCHS:-5}" "${GLOBAL_BATCH:-64}" "${TRAIN_ITERS:-}" "${SHUFFLE:-1}" "$SEED")
read -r iters per_epoch data <<< "$plan"  # the path last: it may hold spaces

DATA_PATH="" LOAD="$load" SAVE="$SAVE" MODEL="$MODEL" SEQ_LEN="$SEQ_LEN" TRAIN_ITERS="$iters" \
GLOBAL_BATCH="${GLOBAL_BATCH:-64}" SAVE_INTERVAL="${SAVE_INTERVAL:-$per_epoch}" PYTHON="$PYTHON" \
exec bash "$here/pretrain_longlora.sh" --sft-data "$data" --tokenizer "$TOKENIZER" \
    --adam-beta2 0.999 --seed "$SEED" "${finetune[@]}" "$@"
