#!/usr/bin/env bash
# Compare SFT and every distillation method on the embedded default (one table).
#   bash scripts/tiny/compare.sh
#   CRITERIA="dual_space_kd_with_cma mcw_kd" EVAL_SEEDS="10 20 30 40 50" bash scripts/tiny/compare.sh
# For each criterion it calls scripts/tiny/run.sh (which reuses the trained teachers, the SFT
# student and every finished evaluation), then builds one ROUGE-L table over all runs with
# `code/evaluate.py compare` into outputs/tiny/compare.{md,csv}. Same-vocabulary methods
# (various_divergence, dual_space_kd) learn from teacher_same_vocab, the others from teacher.
# Environment: CRITERIA, EVAL_SEEDS (default "10 20 30"), plus everything scripts/tiny/run.sh reads.
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${PYTHON:=python}"
: "${CRITERIA:=various_divergence dual_space_kd dual_space_kd_with_cma min_edit_dis_kld universal_logit_distillation multi_level_ot mcw_kd}"
: "${EVAL_SEEDS:=10 20 30}"
: "${OUT:=${BASE_PATH}/outputs/tiny}"
export PYTHON EVAL_SEEDS OUT
best() { "${PYTHON}" "${BASE_PATH}/scripts/lib/find_checkpoint.py" "$1" || true; }

SECONDS=0
for crit in ${CRITERIA}; do
  echo "[compare] ${crit}" >&2
  start=${SECONDS}
  CRITERION="${crit}" bash "${BASE_PATH}/scripts/tiny/run.sh" >/dev/null
  echo "[compare] ${crit} done in $(( SECONDS - start ))s" >&2
done

ROWS=() NAMES=()
add() { local c; c=$(best "$1"); if [[ -n "${c}" ]]; then ROWS+=("${c}"); NAMES+=("$2"); fi; }
add "${OUT}/teacher/sft/run" "teacher (cross-vocab, SFT)"
add "${OUT}/teacher_same_vocab/sft/run" "teacher (same vocab, SFT)"
add "${OUT}/student/sft/run" "student SFT"
for crit in ${CRITERIA}; do add "${OUT}/student/${crit}/run" "student ${crit}"; done
"${PYTHON}" "${BASE_PATH}/code/evaluate.py" compare "${ROWS[@]}" --names "${NAMES[@]}" \
  --out "${OUT}/compare" --log-level WARNING
echo "[compare] done in ${SECONDS}s; table: ${OUT}/compare.md" >&2
