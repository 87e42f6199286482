#!/usr/bin/env bash
# Shared launcher of run_eval.sh and run_eval_lora.sh (sourced, not run directly).
# Inputs: CKPT_PATH, EVAL_BATCH_SIZE, EXTRA (array of extra evaluate.py flags), BASE_PATH.
# Environment (all optional):
#   DATA_DIR     folder with <dataset>/valid.jsonl              (default: $BASE_PATH/data)
#   DATASETS     space-separated dataset names                  (default: dolly self-inst vicuna sinst/11_ dialogsum,
#                                                                 plus uinst/11_ when $DATA_DIR/uinst/11_ exists)
#   SEEDS        space-separated sampling seeds                 (default: 10 20 30 40 50)
#   GPUS         GPU ids, comma or space separated; empty = CPU (default: every GPU nvidia-smi lists)
#   NPROC        processes on CPU (torchrun + gloo) when GPUS is empty (default: 1)
#   MASTER_PORT  torchrun port                                  (default: random in 20000-39999)
#   PYTHON       python executable                              (default: python)
set -euo pipefail

DATA_DIR=${DATA_DIR:-${BASE_PATH}/data}
if [[ -z "${DATASETS:-}" ]]; then
  DATASETS="dolly self-inst vicuna sinst/11_ dialogsum"
  [[ -d "${DATA_DIR}/uinst/11_" ]] && DATASETS="${DATASETS} uinst/11_"
fi
SEEDS=${SEEDS:-"10 20 30 40 50"}
if [[ -z "${GPUS+set}" ]]; then
  GPUS=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, - || true)
fi
GPUS=$(echo "${GPUS}" | tr ' ' ',' | sed 's/,,*/,/g; s/^,//; s/,$//')
NPROC=${NPROC:-1}
MASTER_PORT=${MASTER_PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}

# shellcheck disable=SC2206  # word splitting of the lists is intended
ARGS=(run --ckpt "${CKPT_PATH}" --eval-batch-size "${EVAL_BATCH_SIZE}" --data-dir "${DATA_DIR}"
      --datasets ${DATASETS} --seeds ${SEEDS}
      --max-prompt-length 256 --max-new-tokens 256 --top-k 0 --top-p 1.0 --temperature 1.0
      --no-repeat-ngram-size 6 --dataset-limit uinst/11_=10000 "${EXTRA[@]}")

cd "${BASE_PATH}"
if [[ -n "${GPUS}" ]]; then
  export CUDA_VISIBLE_DEVICES=${GPUS}
  N=$(echo "${GPUS}" | tr ',' '\n' | wc -l)
  if [[ "${N}" -gt 1 ]]; then
    exec "${PYTHON}" -m torch.distributed.run --nproc_per_node "${N}" --master_port "${MASTER_PORT}" code/evaluate.py "${ARGS[@]}" --device cuda
  fi
  exec "${PYTHON}" code/evaluate.py "${ARGS[@]}" --device cuda
elif [[ "${NPROC}" -gt 1 ]]; then
  exec "${PYTHON}" -m torch.distributed.run --nproc_per_node "${NPROC}" --master_port "${MASTER_PORT}" code/evaluate.py "${ARGS[@]}" --device cpu
else
  exec "${PYTHON}" code/evaluate.py "${ARGS[@]}" --device cpu
fi
