#!/usr/bin/env bash
# The dev grid of every method on the embedded default (one training seed), which chose the rows
# of scripts/tiny/methods.tsv. Every method gets the same number of dev runs: its kd_rate grid
# times its one main knob (GRID in scripts/tiny/compare.py; SFT: learning rate x label smoothing).
#   bash scripts/tiny/tune.sh                     # the whole grid (outputs/tiny/tune/tune.md)
#   METHODS="mcw_kd uld" bash scripts/tiny/tune.sh
# Each point trains until its dev loss stops improving and is scored on the 200 dev prompts
# (sampled ROUGE-L x EVAL_SEEDS, greedy ROUGE-L, NLL). Teachers are shared with compare.sh/run.sh.
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${PYTHON:=python}"
: "${JOBS:=2}"
: "${SEED:=10}"
: "${EVAL_SEEDS:=10 20 30}"
: "${METHODS:=}"
export PYTHONPATH="${BASE_PATH}/code${PYTHONPATH:+:${PYTHONPATH}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
opts=(--out "${BASE_PATH}/outputs/tiny/tune" --teacher-out "${BASE_PATH}/outputs/tiny" --jobs "${JOBS}")
# shellcheck disable=SC2206  # lists
opts+=(--seeds "${SEED}" --eval-seeds ${EVAL_SEEDS})
# shellcheck disable=SC2206
[[ -n "${METHODS}" ]] && opts+=(--methods ${METHODS})
"${PYTHON}" "${BASE_PATH}/scripts/tiny/compare.py" tune "${opts[@]}"
