#!/usr/bin/env bash
# The main job on the embedded default: a fresh machine, no GPU, no downloads.
#   bash scripts/tiny/run.sh                          # MCW-KD (its dev-chosen configuration) vs SFT
#   METHOD=uld bash scripts/tiny/run.sh               # any row of scripts/tiny/methods.tsv
# Steps, each through the project's real entry points (scripts/tiny/compare.py drives them):
#   1. build data/tiny and model_hub/tiny (python -m mckd.tiny.build) unless up to date;
#   2. SFT the method's teacher on the teacher's corpus (reused when finished, resumed when not);
#   3. train the student with SFT and with METHOD, one run per training seed (SEEDS), each until
#      its dev loss stops improving, the options from scripts/tiny/methods.tsv;
#   4. evaluate every best-on-dev checkpoint on the test split (published sampling protocol,
#      EVAL_SEEDS sampling seeds, test NLL, greedy decoding) and print the table: each score's
#      mean ± std over training seeds and METHOD's paired difference to SFT with its 95% interval.
# Environment (all optional): METHOD (mcw_kd), SEEDS ("10 20 30"), EVAL_SEEDS ("10 20 30"),
# JOBS (2), OUT (outputs/tiny/run), EVAL_NUM (test prompts, -1 = all 300), BUILD_ARGS (extra
# mckd.tiny.build flags), TEACHER_ARGS / STUDENT_ARGS (extra code/distillation.py flags of the
# teacher / the students, e.g. "--max-steps 20"), ARGS (extra scripts/tiny/compare.py flags, e.g.
# "--max-epochs 5"). Delete outputs/tiny to start over.
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${PYTHON:=python}"
: "${METHOD:=mcw_kd}"
: "${SEEDS:=10 20 30}"
: "${EVAL_SEEDS:=10 20 30}"
: "${JOBS:=2}"
: "${OUT:=${BASE_PATH}/outputs/tiny/run}"
: "${EVAL_NUM:=-1}"
: "${BUILD_ARGS:=}"
: "${TEACHER_ARGS:=}"
: "${STUDENT_ARGS:=}"
: "${ARGS:=}"
export PYTHONPATH="${BASE_PATH}/code${PYTHONPATH:+:${PYTHONPATH}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
[[ "${METHOD}" != sft ]] || { echo "[tiny] error: METHOD=sft is the baseline; pick a KD method" >&2; exit 2; }
SECONDS=0
# shellcheck disable=SC2086  # lists
"${PYTHON}" "${BASE_PATH}/scripts/tiny/compare.py" compare --methods sft "${METHOD}" \
  --seeds ${SEEDS} --eval-seeds ${EVAL_SEEDS} --eval-num "${EVAL_NUM}" --jobs "${JOBS}" \
  --out "${OUT}" --teacher-out "${BASE_PATH}/outputs/tiny" --build-args "${BUILD_ARGS}" \
  --teacher-args "${TEACHER_ARGS}" --train-args "${STUDENT_ARGS}" ${ARGS}
echo "[tiny] done in ${SECONDS}s; every run: ${OUT}/scores.csv" >&2
