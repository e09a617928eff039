#!/usr/bin/env bash
# LongLoRA context extension on megatron-core, launched with torchrun.
#
# Run directly, it starts torchrun for this node:
#   MODEL=llama2-7b SEQ_LEN=32768 LOAD=ckpt/llama2-7b DATA_PATH=data/pg19_text_document \
#   SAVE=runs/7b-32k NNODES=1 NPROC_PER_NODE=8 bash examples/pretrain_longlora.sh [extra flags]
# Under torchrun it is the per-rank command:
#   torchrun --nnodes 2 ... --no-python bash examples/pretrain_longlora.sh [extra flags]
#
# Environment (defaults in brackets):
#   MODEL        llama2-7b | llama2-13b | llama2-70b | tiny  (recipe; the architecture itself
#                comes from the LOAD checkpoint when given) [llama2-7b]
#   SEQ_LEN      target context length [32768]
#   LOAD         converted checkpoint (tools/checkpoint_convert.py hf-to-megatron)   [none]
#   DATA_PATH    IndexedDataset prefix from tools/preprocess_data.py                 [required]
#   SAVE         checkpoint directory                                                [runs/$MODEL-$SEQ_LEN]
#   TP, PP, CP   parallel sizes                                     [from the recipe below]
#   MICRO_BATCH, GLOBAL_BATCH, TRAIN_ITERS, LR                       [1, 64, 1000, 2e-5]
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE  torchrun rendezvous
#                [1, 0, 127.0.0.1, 29500, number of GPUs or 1]
#   PYTHON       the interpreter [python3, or .venv/bin/python when present]
#
# Recipes (one 8x80GB node unless NNODES says otherwise), LoRA+ with S²-Attn, bf16, full recompute:
#   llama2-7b  32k : TP=2 with sequence parallel, DP=4
#   llama2-7b 100k : TP=8 with sequence parallel (LongLoRA's 100k run fits one node this way)
#   llama2-13b 32k : TP=4 with sequence parallel
#   llama2-70b 32k : TP=8 with sequence parallel; PP=NNODES across nodes
#   tiny           : CPU demo and tests (gloo), no recipe flags
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-$([[ -x "$root/.venv/bin/python" ]] && echo "$root/.venv/bin/python" || echo python3)}"
MODEL="${MODEL:-llama2-7b}"
SEQ_LEN="${SEQ_LEN:-32768}"

if [[ -z "${LOCAL_RANK:-}" ]]; then
    # Not under torchrun yet: start it for this node, with this script as the per-rank command.
    if [[ -z "${NPROC_PER_NODE:-}" ]]; then
        NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
        [[ "${NPROC_PER_NODE:-0}" -ge 1 ]] || NPROC_PER_NODE=1
    fi
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
        --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
        --nproc-per-node "$NPROC_PER_NODE" --no-python bash "$here/pretrain_longlora.sh" "$@"
fi

# megatron overlaps TP communication with compute only when kernels queue on one CUDA connection.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
recipe=()
case "$MODEL:$SEQ_LEN" in
    llama2-7b:*)  # beyond 64k the activations need all 8 GPUs of the node
                  if (( SEQ_LEN > 65536 )); then default_tp=8; else default_tp=2; fi
                  recipe=(--tensor-model-parallel-size "${TP:-$default_tp}") ;;
    llama2-13b:*) recipe=(--tensor-model-parallel-size "${TP:-4}") ;;
    llama2-70b:*) recipe=(--tensor-model-parallel-size "${TP:-8}"
                          --pipeline-model-parallel-size "${PP:-${NNODES:-1}}") ;;
    tiny:*)       recipe=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}") ;;
    *) echo "error: unknown MODEL=$MODEL (llama2-7b, llama2-13b, llama2-70b, tiny)" >&2; exit 2 ;;
esac
if [[ "$MODEL" != tiny ]]; then
    recipe+=(--bf16 --recompute-granularity full --use-distributed-optimizer)
    # Sequence parallel shards activations over the TP ranks; it needs more than one.
    [[ "${recipe[1]}" != 1 ]] && recipe+=(--sequence-parallel)
fi
model_source=(--model "$MODEL")
[[ -n "${LOAD:-}" ]] && model_source=(--load "$LOAD")
[[ -n "${CP:-}" ]] && recipe+=(--context-parallel-size "$CP")
[[ -n "${DATA_PATH:-}" ]] && recipe+=(--data-path $DATA_PATH)

exec "$PYTHON" "$here/pretrain_longlora.py" \
    "${model_source[@]}" \
    --seq-length "$SEQ_LEN" \
    --attention s2 --group-size-ratio 0.25 \
    --micro-batch-size "${MICRO_BATCH:-1}" --global-batch-size "${GLOBAL_BATCH:-64}" \
    --train-iters "${TRAIN_ITERS:-1000}" --lr "${LR:-2e-5}" --lr-warmup-iters 20 \
    --lr-decay-style constant --weight-decay 0.0 \
    --save "${SAVE:-runs/$MODEL-$SEQ_LEN}" --save-interval "${SAVE_INTERVAL:-100}" \
    --exit-signal-handler \
    "${recipe[@]}" "$@"
