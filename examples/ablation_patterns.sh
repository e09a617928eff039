#!/usr/bin/env bash
# The LongLoRA paper's attention-pattern table (its Table 6) in miniature, on CPU (about 30
# minutes on 2 idle cores): a small Llama pre-trained with dense attention at BASE tokens is
# extended to 2x, 4x and 8x BASE with linear position interpolation and G = N/4, so the group
# size is 1/2, 1 and 2 times the base context; at each target three arms train:
#   full   dense attention                              (trained long)
#   short  groups of G without the shift                (trained short, the paper's ablation)
#   s2     S2-Attn: half the heads shifted by G/2       (trained short)
# and each is evaluated at N with dense attention and (short, s2) with its own pattern
# (tools/eval_ppl.py --eval-attention), and by the repeat probe (--repeat-probe: windows whose
# second half repeats the first, scored on the copy: can dense attention reach N/2 = 2G tokens
# back after training that never attended past G?). LoRA+ (LoRA r=8 on q,k,v,o plus embedding and norms)
# stands in for the paper's full fine-tuning: examples/ablation_tiny.sh found the two within
# 0.3 ppl of each other at 8x, and LoRA+ is what users of S2-Attn train.
#
# Data: the Python standard library's sources, every 10th file held out; a 1000-piece
# sentencepiece tokenizer trained on the training files. The same seed, data order, learning
# rate and tokens per step (TOKENS_PER_STEP, as whole sequences) for every arm of every target.
#
#   bash examples/ablation_patterns.sh          # writes runs/ablation_patterns/{table.md,...}
#   SMOKE=1 bash examples/ablation_patterns.sh  # every step at toy settings (~4 min)
#   REPEAT_CHUNK=300 bash examples/ablation_patterns.sh  # copy-rich training text (below)
#
# REPEAT_CHUNK: the base model trained on the stdlib text does not copy a passage from 128
# tokens back (the repeat probe shows it), so nothing rewards attending far. With every
# REPEAT_CHUNK characters of the training text written twice (300: about 128 tokens, half the
# base context) copying pays, and the probe asks whether each arm's model copies from N/2 = 2G
# back under dense attention; held-out text is never repeated. At the committed 800 base steps
# the base model still does not learn to copy (docs/RESULTS.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source "$root/examples/_env.sh"
source "$root/examples/_ablation.sh"
megalong_env
work="${MEGALONG_ABLATION_DIR:-$root/runs/ablation_patterns}"
if [[ -n "${SMOKE:-}" ]]; then  # the smoke run's defaults: every step, minutes not half an hour
    : "${BASE_ITERS:=20}" "${EXT_ITERS:=3}" "${EVAL_WINDOWS:=4}" "${MODEL:=tiny}" "${BASE:=128}"
fi
MODEL="${MODEL:-mini}"             # architecture preset of the base model
BASE="${BASE:-256}"                # the base model's context (pre-training length)
BASE_ITERS="${BASE_ITERS:-800}"    # pre-training steps at BASE tokens, 16 sequences each
EXT_ITERS="${EXT_ITERS:-120}"      # extension steps per arm
TOKENS_PER_STEP="${TOKENS_PER_STEP:-4096}"
EXT_LR="${EXT_LR:-2e-3}"
EVAL_WINDOWS="${EVAL_WINDOWS:-96}"
SEED="${SEED:-1234}"
REPEAT_CHUNK="${REPEAT_CHUNK:-0}"  # >0: train on text with every REPEAT_CHUNK characters twice
targets=("$((2 * BASE))" "$((4 * BASE))" "$((8 * BASE))")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
rm -rf "$work" && mkdir -p "$work/logs" "$work/eval"
log() { echo "[ablation] $(date +%H:%M:%S) $*" >&2; }
log "model $MODEL, base context $BASE, targets ${targets[*]}; $BASE_ITERS base steps, $EXT_ITERS per arm"

ablation_data
ablation_base "$MODEL" "$BASE" "$BASE_ITERS" 30 10

evaluate() {  # N name checkpoint kind [eval_ppl flags]; kind: dense (with the probe), own
    local n="$1" name="$2" ckpt="$3" kind="$4"
    shift 4
    "$PY" tools/eval_ppl.py --load "$ckpt" "$@" --data "$work/data/heldout" --seq-lengths "$n" \
        --max-windows "$EVAL_WINDOWS" --json "$work/eval/N${n}_${name}_${kind}.json" --quiet \
        > /dev/null
}
log "evaluation: the base model at its own context $BASE, ordinary windows and the repeat probe"
evaluate "$BASE" base "$work/base" dense --repeat-probe
for n in "${targets[@]}"; do
    factor=$((n / BASE))
    batch=$((TOKENS_PER_STEP / n > 0 ? TOKENS_PER_STEP / n : 1))
    micro=$((batch < 4 ? batch : 4))
    pi=(--rotary-seq-len-interpolation-factor "$factor")
    evaluate "$n" base_pi "$work/base" dense "${pi[@]}" --repeat-probe
    for arm in full short s2; do
        log "N=$n (${factor}x, G=$((n / 4))): $arm attention, LoRA+, batch $batch x $n tokens"
        "$PY" examples/pretrain_longlora.py --load "$work/base" --finetune --attention "$arm" \
            --trainable-params embed,norm --seq-length "$n" --group-size-ratio 0.25 "${pi[@]}" \
            --micro-batch-size "$micro" --global-batch-size "$batch" --train-iters "$EXT_ITERS" \
            --lr "$EXT_LR" --lr-warmup-iters 10 --lr-decay-style constant \
            --save "$work/N${n}_$arm" "${common[@]}" 2> >(tee "$work/logs/N${n}_$arm.log" >&2)
        evaluate "$n" "$arm" "$work/N${n}_$arm" dense --repeat-probe
        [[ "$arm" != full ]] && evaluate "$n" "$arm" "$work/N${n}_$arm" own --eval-attention "$arm"
        rm -rf "$work/N${n}_$arm"  # the numbers are in eval/; checkpoints are 10s of MB each
    done
done

targets_csv="$(IFS=,; echo "${targets[*]}")"
"$PY" -m megalong.eval.pattern_ablation "$work" --base-length "$BASE" --targets "$targets_csv"
log "done in $SECONDS s: $work/table.md, $work/ablation_patterns.png, $work/summary.json"
