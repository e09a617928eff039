#!/usr/bin/env bash
# The LongLoRA paper's claims in miniature, on CPU (about 25 minutes on 2 cores):
#   a tiny Llama pre-trained at 128 tokens is extended 8x, to 1024 tokens with linear position
#   interpolation (factor 8), by
#     (a) plain LoRA (q,k,v,o adapters only) vs LoRA+ (adapters + embedding + norms) vs full
#         fine-tuning, all with S2-Attn while training;
#     (b) LoRA+ with S2-Attn vs LoRA+ with dense attention while training;
#   plus the base model evaluated as is and with position interpolation only.
# Every arm starts from the same base checkpoint and trains the same steps on the same data with
# the same seed and learning rate; every model is evaluated with dense attention on held-out text
# (tools/eval_ppl.py, LongLoRA's windows) at 128..1024 tokens.
#
# Data: the Python standard library's sources (text every Python has; later lines refer to names
# defined far earlier), every 10th file held out for evaluation; a 1000-piece sentencepiece
# tokenizer trained on the training files.
#
#   bash examples/ablation_tiny.sh            # writes runs/ablation_tiny/{table.md,ablation_tiny.png,...}
#   BASE_ITERS=50 EXT_ITERS=10 bash examples/ablation_tiny.sh   # a quick smoke run
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source "$root/examples/_env.sh"
source "$root/examples/_ablation.sh"
megalong_env
work="${MEGALONG_ABLATION_DIR:-$root/runs/ablation_tiny}"
BASE_ITERS="${BASE_ITERS:-3000}"   # pre-training steps at SHORT tokens (16 sequences each)
EXT_ITERS="${EXT_ITERS:-400}"      # extension steps at LONG tokens (4 sequences each)
EXT_LR="${EXT_LR:-2e-3}"
EVAL_WINDOWS="${EVAL_WINDOWS:-96}"
SEED="${SEED:-1234}"
SHORT=128 LONG=1024 FACTOR=8
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
rm -rf "$work" && mkdir -p "$work/logs" "$work/eval"
log() { echo "[ablation] $(date +%H:%M:%S) $*" >&2; }

ablation_data
ablation_base tiny "$SHORT" "$BASE_ITERS" 50 50

# name | flags. Everything else is the same for every arm.
arms=(
    "lora_s2|--attention s2 --trainable-params none"
    "lora_plus_s2|--attention s2 --trainable-params embed,norm"
    "full_ft_s2|--attention s2 --full-finetune"
    "lora_plus_dense|--attention full --trainable-params embed,norm"
)
seconds=()
for arm in "${arms[@]}"; do
    name="${arm%%|*}"
    read -r -a flags <<< "${arm#*|}"
    log "extension arm $name: $LONG tokens, interpolation factor $FACTOR, ${flags[*]}"
    start=$(date +%s)
    "$PY" examples/pretrain_longlora.py --load "$work/base" --finetune "${flags[@]}" \
        --seq-length "$LONG" --rotary-seq-len-interpolation-factor "$FACTOR" \
        --micro-batch-size 2 --global-batch-size 4 --train-iters "$EXT_ITERS" --lr "$EXT_LR" \
        --lr-warmup-iters 10 --lr-decay-style constant --save "$work/$name" "${common[@]}" \
        2> >(tee "$work/logs/$name.log" >&2)
    seconds+=("$(( $(date +%s) - start ))")
done

log "evaluation: dense attention, held-out text, ${EVAL_WINDOWS} windows per length"
evaluate() {  # name checkpoint [extra flags]
    local name="$1" ckpt="$2"
    shift 2
    "$PY" tools/eval_ppl.py --load "$ckpt" "$@" --data "$work/data/heldout" \
        --seq-lengths 128,256,512,1024 --stride 256 --max-windows "$EVAL_WINDOWS" \
        --json "$work/eval/$name.json" --quiet > "$work/eval/$name.md"
}
evaluate base "$work/base"
evaluate base_pi "$work/base" --rotary-seq-len-interpolation-factor "$FACTOR"
for arm in "${arms[@]}"; do
    evaluate "${arm%%|*}" "$work/${arm%%|*}"
done

labels=("base (no interpolation)" "base + PI x8 (no training)" "LoRA (q,k,v,o), S2-Attn"
        "LoRA+ (embed, norm), S2-Attn" "full fine-tune, S2-Attn" "LoRA+ (embed, norm), dense attn")
reports=()
for name in base base_pi lora_s2 lora_plus_s2 full_ft_s2 lora_plus_dense; do
    reports+=("$work/eval/$name.json")
done
"$PY" -m megalong.cli.report --json "${reports[@]}" --labels "${labels[@]}" \
    --title "tiny Llama extended $SHORT -> $LONG tokens (held-out ppl)" --mark-length "$SHORT" \
    --plot "$work/ablation_tiny.png" --out "$work/table.md" > /dev/null

{
    echo
    echo "| arm | trainable parameters | training wall time (s) | final training loss |"
    echo "|---|---:|---:|---:|"
    for i in "${!arms[@]}"; do
        name="${arms[$i]%%|*}"
        trainable=$(grep -o 'trainable parameters: [0-9,]* of [0-9,]*' "$work/logs/$name.log" | tail -1 |
                    sed 's/trainable parameters: //')
        loss=$(grep -o 'loss [0-9.]*' "$work/logs/$name.log" | tail -1 | sed 's/loss //')
        echo "| $name | $trainable | ${seconds[$i]} | $loss |"
    done
} >> "$work/table.md"
log "done in $SECONDS s: $work/table.md and $work/ablation_tiny.png"
cat "$work/table.md"
