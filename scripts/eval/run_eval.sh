#!/usr/bin/env bash
# Evaluate a full fine-tuned checkpoint with the published protocol (5 datasets x 5 sampling seeds).
# Usage: bash scripts/eval/run_eval.sh <CKPT_PATH> [EVAL_BATCH_SIZE=32] [extra code/evaluate.py run flags]
#   e.g. bash scripts/eval/run_eval.sh outputs/gpt2/gpt2-base/.../epoch20_step4000 32
#        GPUS= DATASETS="dolly" SEEDS="10" bash scripts/eval/run_eval.sh CKPT 8 --dev-num 50 --greedy
# Results: <CKPT_PATH>/eval/<dataset>/seed<k>/{predictions.jsonl,metrics.json}, <CKPT_PATH>/eval/results.{json,md}.
# Environment: DATA_DIR DATASETS SEEDS GPUS NPROC MASTER_PORT PYTHON (see scripts/eval/common.sh).
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ $# -lt 1 ]]; then
  echo "usage: bash scripts/eval/run_eval.sh <CKPT_PATH> [EVAL_BATCH_SIZE=32] [extra evaluate.py flags]" >&2
  exit 2
fi
CKPT_PATH=$(cd "$1" && pwd)
EVAL_BATCH_SIZE=${2:-32}
shift $(( $# >= 2 ? 2 : 1 ))
EXTRA=("$@")
source "${BASE_PATH}/scripts/eval/common.sh"
