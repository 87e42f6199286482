#!/usr/bin/env bash
# Evaluate a LoRA adapter with the published protocol (5 datasets x 5 sampling seeds).
# Usage: bash scripts/eval/run_eval_lora.sh <LORA_ADAPTER_PATH> [EVAL_BATCH_SIZE=16] [extra code/evaluate.py run flags]
#   MODEL_PATH=model_hub/tinyllama/tinyllama-1.1b-3T bash scripts/eval/run_eval_lora.sh outputs/.../epoch10_step900 16
# The base model is MODEL_PATH when set, else the adapter's adapter_config.json base_model_name_or_path
# (a local directory; nothing is downloaded). The adapter is applied unmerged, as published.
# Results: <LORA_ADAPTER_PATH>/eval/... (see run_eval.sh). Environment: MODEL_PATH DATA_DIR DATASETS SEEDS GPUS NPROC.
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ $# -lt 1 ]]; then
  echo "usage: bash scripts/eval/run_eval_lora.sh <LORA_ADAPTER_PATH> [EVAL_BATCH_SIZE=16] [extra evaluate.py flags]" >&2
  exit 2
fi
CKPT_PATH=$(cd "$1" && pwd)
if [[ ! -f "${CKPT_PATH}/adapter_config.json" ]]; then
  echo "run_eval_lora.sh: ${CKPT_PATH} has no adapter_config.json (use run_eval.sh for full checkpoints)" >&2
  exit 2
fi
EVAL_BATCH_SIZE=${2:-16}
shift $(( $# >= 2 ? 2 : 1 ))
EXTRA=()
if [[ -n "${MODEL_PATH:-}" ]]; then
  EXTRA+=(--base-model-path "$(cd "${MODEL_PATH}" && pwd)")
fi
EXTRA+=("$@")
source "${BASE_PATH}/scripts/eval/common.sh"
