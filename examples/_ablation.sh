# Shared steps of examples/ablation_*.sh (sourced after examples/_env.sh; uses PY, log, work).

# The data: the standard library's sources, every 10th file held out; a 1000-piece sentencepiece
# tokenizer trained on the training files; IndexedDatasets $work/data/{train,heldout}. With
# REPEAT_CHUNK > 0 the training text has every REPEAT_CHUNK characters written twice (the held-out
# text never). Sets `tok`.
ablation_data() {
    log "data: stdlib sources, every 10th file held out; tokenizer; IndexedDatasets"
    "$PY" -m megalong.data.demo_text "$work/all.jsonl" --source stdlib
    awk 'NR % 10 != 0' "$work/all.jsonl" > "$work/train.jsonl"
    awk 'NR % 10 == 0' "$work/all.jsonl" > "$work/heldout.jsonl"
    "$PY" tools/train_tokenizer.py --input "$work/train.jsonl" --vocab-size 1000 --out "$work/tok"
    tok="$work/tok/tokenizer.model"
    if (( ${REPEAT_CHUNK:-0} > 0 )); then
        log "training text: every $REPEAT_CHUNK characters written twice"
        "$PY" -m megalong.data.demo_text "$work/all_repeated.jsonl" --source stdlib \
            --repeat-chunks "$REPEAT_CHUNK"
        awk 'NR % 10 != 0' "$work/all_repeated.jsonl" > "$work/train.jsonl"
    fi
    for split in train heldout; do
        "$PY" tools/preprocess_data.py --input "$work/$split.jsonl" \
            --output-prefix "$work/data/$split" --tokenizer "$tok"
    done
}

# The base model: a random MODEL pre-trained with dense attention (all weights) at SEQ tokens,
# 16 sequences per step, lr 3e-3 cosine to 3e-4, into $work/base. Sets `common`, the training
# flags every arm shares.
ablation_base() {  # model seq-length iterations warm-up-iterations log-interval
    local model="$1" seq="$2" iters="$3" warmup="$4" interval="$5"
    log "base model: random $model, pre-trained at $seq tokens (dense attention, all weights)"
    "$PY" tools/make_random_model.py --model "$model" --out "$work/random_hf" --seed "$SEED"
    "$PY" tools/checkpoint_convert.py hf-to-megatron --hf-dir "$work/random_hf" --out "$work/random"
    common=(--data-path "$work/data/train" --tokenizer "$tok" --split 100,0,0 --seed "$SEED"
            --log-interval "$interval" --adam-eps 1e-8 --clip-grad 1.0)
    "$PY" examples/pretrain_longlora.py --load "$work/random" --finetune --full-finetune \
        --attention full --seq-length "$seq" --micro-batch-size 16 --global-batch-size 16 \
        --train-iters "$iters" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters "$warmup" \
        --lr-decay-style cosine --save "$work/base" "${common[@]}" \
        2> >(tee "$work/logs/base.log" >&2)
}
