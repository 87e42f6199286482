#!/usr/bin/env bash
# kd_rate tuning of every method on the DEV split (one training seed), for scripts/tiny/compare.sh.
#   bash scripts/tiny/tune.sh                                  # the grid of docs/RESULTS.md
#   bash scripts/tiny/tune.sh mcw_kd:0.5 "mcw_kd:0:--mcw-w-hidden,0"   # chosen points
# A point is METHOD:KD_RATE[:FLAGS] (FLAGS: distillation.py flags, commas for spaces). Each point
# trains into outputs/tiny/tune/<point>/ (reused when done) and is scored with code/evaluate.py on
# all 200 dev prompts (sampling seeds EVAL_SEEDS, default "10 20"); the table is appended to
# outputs/tiny/tune/tune.md. Teachers are shared with compare.sh / run.sh.
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${PYTHON:=python}"
: "${JOBS:=2}"
: "${SEED:=10}"
: "${EVAL_SEEDS:=10 20}"
export PYTHONPATH="${BASE_PATH}/code${PYTHONPATH:+:${PYTHONPATH}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
GRID=("$@")
if [[ ${#GRID[@]} == 0 ]]; then
  GRID=(sft:0
        vanilla_kd:0.2 vanilla_kd:0.5 vanilla_kd:0.8
        dskd:0.2 dskd:0.5 dskd:0.8
        dskd_cma:0.1 dskd_cma:0.5
        mined:0.2 mined:0.5 uld:0.2 uld:0.5
        multi_level_ot:0.3 multi_level_ot:1.0
        mcw_kd:5.0 mcw_kd:0.5 mcw_kd:0)
fi
# shellcheck disable=SC2086
"${PYTHON}" -m mckd.tiny.compare tune "${GRID[@]}" --out "${BASE_PATH}/outputs/tiny/tune" \
  --teacher-out "${BASE_PATH}/outputs/tiny" --jobs "${JOBS}" --seeds "${SEED}" \
  --eval-seeds ${EVAL_SEEDS}
