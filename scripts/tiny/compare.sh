#!/usr/bin/env bash
# The paper's comparison in miniature on the embedded default (docs/RESULTS.md has the results).
#   bash scripts/tiny/compare.sh                          # main table: both settings, every method
#   CONTROLS=1 bash scripts/tiny/compare.sh               # + cross-vocabulary methods, same teacher
#   ON_POLICY="vanilla_kd mcw_kd uld_hybrid" bash scripts/tiny/compare.sh   # + on-policy variants
#   METHODS="sft mcw_kd" SEEDS="10 20 30" bash scripts/tiny/compare.sh
# Trains (or reuses) the SFT teachers in outputs/tiny/<teacher>/sft/run (shared with run.sh), then
# one student per method and training seed in ${OUT}/<method>/seed<k>, each until its dev loss
# stops improving, with the options of scripts/tiny/methods.tsv; evaluates each best-on-dev
# checkpoint on the 300 test prompts (published sampling protocol x EVAL_SEEDS, test NLL, greedy)
# and writes ${OUT}/table.{md,csv} (paired differences to SFT with 95% intervals), scores.csv
# (every run), loss_curves.png, differences.png and timing.json. Finished stages are reused,
# unfinished ones resumed.
# Environment: SEEDS (training seeds, default "10 20 30 40 50"), EVAL_SEEDS ("10 20 30"), JOBS (2),
# METHODS (default: every row of methods.tsv), CONTROLS (1: add the controls; only: SFT and the
# controls alone), ON_POLICY (methods also trained on-policy, label <method>+on_policy; default
# none; the on-policy column of docs/RESULTS.md: "vanilla_kd mcw_kd uld_hybrid"), OUT (outputs/tiny/compare), ARGS (extra
# scripts/tiny/compare.py flags).
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${PYTHON:=python}"
: "${SEEDS:=10 20 30 40 50}"
: "${EVAL_SEEDS:=10 20 30}"
: "${JOBS:=2}"
: "${METHODS:=}"
: "${CONTROLS:=0}"
: "${ON_POLICY=}"
: "${OUT:=${BASE_PATH}/outputs/tiny/compare}"
: "${ARGS:=}"
export PYTHONPATH="${BASE_PATH}/code${PYTHONPATH:+:${PYTHONPATH}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
opts=(--out "${OUT}" --teacher-out "${BASE_PATH}/outputs/tiny" --jobs "${JOBS}")
# shellcheck disable=SC2206  # lists
opts+=(--seeds ${SEEDS} --eval-seeds ${EVAL_SEEDS})
# shellcheck disable=SC2206
[[ -n "${METHODS}" ]] && opts+=(--methods ${METHODS})
# shellcheck disable=SC2206
[[ -n "${ON_POLICY}" ]] && opts+=(--on-policy ${ON_POLICY})
case "${CONTROLS}" in 1) opts+=(--controls) ;; only) opts+=(--controls-only) ;; esac
SECONDS=0
# shellcheck disable=SC2086
"${PYTHON}" "${BASE_PATH}/scripts/tiny/compare.py" compare "${opts[@]}" ${ARGS}
echo "[compare] done in ${SECONDS}s; table: ${OUT}/table.md" >&2
