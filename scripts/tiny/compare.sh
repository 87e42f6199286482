#!/usr/bin/env bash
# The paper's comparison in miniature on the embedded default (docs/RESULTS.md has the results).
#   bash scripts/tiny/compare.sh                          # both settings, every method, seeds 10 20 30
#   SEEDS="10 20 30 40 50" JOBS=2 bash scripts/tiny/compare.sh
#   METHODS="sft mcw_kd" ARGS="--rate mcw_kd=0.5" bash scripts/tiny/compare.sh
# Trains (or reuses) both SFT teachers in outputs/tiny/<teacher>/sft/run (shared with run.sh), then
# one student per method and training seed in ${OUT}/<method>/seed<k> (same vocabulary: SFT,
# vanilla KD, DSKD; cross vocabulary: SFT, DSKD-CMA, MinED, ULD, Multi-Level OT, MCW-KD), JOBS
# stages at a time; evaluates every checkpoint on the test split (data/tiny/valid.jsonl, 300
# prompts) with the published sampling protocol and writes ${OUT}/table.{md,csv} (mean ± std over
# training seeds), scores.csv, loss_curves.png, scores.png and timing.json.
# The kd_rate of every method is the one tuned on the dev split by scripts/tiny/tune.sh
# (TUNED in code/mckd/tiny/compare.py; the grid and its dev scores are in docs/RESULTS.md).
# Environment: SEEDS (training seeds), EVAL_SEEDS (sampling seeds per checkpoint, default "10"),
# JOBS (default 2), METHODS, OUT (default outputs/tiny/compare), STUDENT_EPOCH (1),
# TEACHER_EPOCH (4), ARGS (extra `python -m mckd.tiny.compare compare` flags).
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${PYTHON:=python}"
: "${SEEDS:=10 20 30}"
: "${EVAL_SEEDS:=10}"
: "${JOBS:=2}"
: "${METHODS:=sft vanilla_kd dskd dskd_cma mined uld multi_level_ot mcw_kd}"
: "${OUT:=${BASE_PATH}/outputs/tiny/compare}"
: "${STUDENT_EPOCH:=1}"
: "${TEACHER_EPOCH:=4}"
: "${ARGS:=}"
export PYTHONPATH="${BASE_PATH}/code${PYTHONPATH:+:${PYTHONPATH}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
SECONDS=0
# shellcheck disable=SC2086  # lists
"${PYTHON}" -m mckd.tiny.compare compare --out "${OUT}" --teacher-out "${BASE_PATH}/outputs/tiny" \
  --jobs "${JOBS}" --seeds ${SEEDS} --eval-seeds ${EVAL_SEEDS} --methods ${METHODS} \
  --student-epoch "${STUDENT_EPOCH}" --teacher-epoch "${TEACHER_EPOCH}" ${ARGS}
echo "[compare] done in ${SECONDS}s; table: ${OUT}/table.md" >&2
