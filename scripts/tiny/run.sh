#!/usr/bin/env bash
# The main job on the embedded default: a fresh machine, no GPU, no downloads.
#   bash scripts/tiny/run.sh                        # MCW-KD student, CPU, a few minutes
#   CRITERION=dual_space_kd_with_cma bash scripts/tiny/run.sh
# Steps (each through the project's real entry points, nothing special-cased in the library):
#   1. build data/tiny and model_hub/tiny (python -m mckd.tiny.build) when missing;
#   2. SFT the teacher (code/distillation.py, cross_entropy) - reused when already trained;
#   3. SFT the student as the baseline (BASELINE=0 skips it);
#   4. distil the student with CRITERION (default mcw_kd; the same-vocabulary teacher is used for
#      various_divergence and dual_space_kd);
#   5. evaluate each model on data/tiny/valid.jsonl (code/evaluate.py, published sampling protocol)
#      and print the ROUGE-L table (also written to outputs/tiny/results.{md,csv}).
# Environment (all optional): CRITERION, BASELINE, TEACHER_EPOCH (4), STUDENT_EPOCH (2),
# BUILD_ARGS (extra mckd.tiny.build flags, e.g. "--train-size 8000"), OUT (outputs/tiny),
# EVAL_SEEDS ("10"), EVAL_NUM (test examples, -1 = all), EVAL_ARGS (extra evaluate.py flags),
# TEACHER_ARGS / STUDENT_ARGS (extra distillation.py flags of the stage), plus every variable of
# scripts/tiny/train.sh and scripts/lib/common.sh (GPUS, LR, BATCH_SIZE, ...). Each stage looks at
# the state its run recorded (python -m mckd.train.rundir state): a finished run is reused, an
# unfinished one (interrupted, killed) is resumed, a diverged one - or one older than the
# rebuilt assets - is moved aside (RUN_DIR.old-<date>) and retrained; delete outputs/tiny to
# start over.
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TRAIN="${BASE_PATH}/scripts/tiny/train.sh"
: "${PYTHON:=python}"
: "${CRITERION:=mcw_kd}"
: "${BASELINE:=1}"
: "${TEACHER_EPOCH:=4}"
: "${STUDENT_EPOCH:=2}"
: "${EVAL_SEEDS:=10}"
: "${EVAL_NUM:=-1}"
: "${EVAL_ARGS:=}"
: "${TEACHER_ARGS:=}"
: "${STUDENT_ARGS:=}"
: "${BUILD_ARGS:=}"
: "${GPUS=}"
export GPUS PYTHON
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="${BASE_PATH}/code${PYTHONPATH:+:${PYTHONPATH}}"
: "${OUT:=${BASE_PATH}/outputs/tiny}"
say() { echo "[tiny] $*" >&2; }
best() { "${PYTHON}" "${BASE_PATH}/scripts/lib/find_checkpoint.py" "$1" || true; }
run_state() { "${PYTHON}" -m mckd.train.rundir state "$1"; }
set_aside() { "${PYTHON}" -m mckd.train.rundir set-aside "$1"; }

# stage NAME RUN_DIR ENV... : reuse a finished run, resume an unfinished one, retrain a diverged
# or stale one; print the best checkpoint
stage() {
  local name=$1 dir=$2 state ckpt resume=0; shift 2
  state=$(run_state "${dir}")
  if [[ "${state}" != empty && -f "${dir}/args.json" && "${MANIFEST}" -nt "${dir}/args.json" ]]; then
    state=stale   # the assets were rebuilt after this run: its model and data are stale
  fi
  case "${state}" in
    finished) ckpt=$(best "${dir}")
              if [[ -n "${ckpt}" ]]; then say "${name}: reusing ${ckpt}"; echo "${ckpt}"; return; fi
              say "${name}: ${dir} finished without a usable checkpoint; moving it aside"
              set_aside "${dir}" >/dev/null ;;
    diverged|stale) say "${name}: the run in ${dir} is ${state}; moved to $(set_aside "${dir}"), retraining" ;;
    unfinished) say "${name}: resuming the unfinished run in ${dir}"; resume=1 ;;
    *) say "${name}: training into ${dir}" ;;
  esac
  env SAVE_PATH="${dir}" RESUME="${resume}" "$@" bash "${TRAIN}" >&2 || true
  state=$(run_state "${dir}")
  ckpt=$(best "${dir}")
  if [[ "${state}" != finished || -z "${ckpt}" ]]; then
    say "error: ${name} did not finish (${state}) in ${dir}; see ${dir}/train.log"
    exit 1
  fi
  echo "${ckpt}"
}

MANIFEST="${BASE_PATH}/model_hub/tiny/manifest.json"
SECONDS=0
say "1/5 assets"
# shellcheck disable=SC2086
"${PYTHON}" -m mckd.tiny.build --out "${BASE_PATH}" ${BUILD_ARGS} >&2

case "${CRITERION}" in
  various_divergence|dual_space_kd) TEACHER=teacher_same_vocab ;;
  cross_entropy) say "error: CRITERION=cross_entropy is the baseline; pick a KD criterion"; exit 2 ;;
  *) TEACHER=teacher ;;
esac

say "2/5 SFT of the ${TEACHER}"
TEACHER_CKPT=$(stage "teacher SFT" "${OUT}/${TEACHER}/sft/run" MODEL="${TEACHER}" \
  CRITERION=cross_entropy EPOCH="${TEACHER_EPOCH}" EXTRA_ARGS="${TEACHER_ARGS}")

ROWS=("${TEACHER_CKPT}") NAMES=("teacher (${TEACHER}, SFT)")
if [[ "${BASELINE}" == 1 ]]; then
  say "3/5 SFT of the student (baseline)"
  SFT_CKPT=$(stage "student SFT" "${OUT}/student/sft/run" MODEL=student CRITERION=cross_entropy \
    EPOCH="${STUDENT_EPOCH}" EXTRA_ARGS="${STUDENT_ARGS}")
  ROWS+=("${SFT_CKPT}") NAMES+=("student SFT")
fi

say "4/5 distillation of the student with ${CRITERION}"
KD_CKPT=$(stage "student ${CRITERION}" "${OUT}/student/${CRITERION}/run" MODEL=student \
  CRITERION="${CRITERION}" EPOCH="${STUDENT_EPOCH}" TEACHER_MODEL_PATH="${TEACHER_CKPT}" \
  TEACHER_MODEL_NAME="${TEACHER}" EXTRA_ARGS="${STUDENT_ARGS}")
ROWS+=("${KD_CKPT}") NAMES+=("student ${CRITERION}")

say "5/5 evaluation on data/tiny/valid.jsonl"
for ckpt in "${ROWS[@]}"; do
  # shellcheck disable=SC2086  # EVAL_SEEDS and EVAL_ARGS are lists
  "${PYTHON}" "${BASE_PATH}/code/evaluate.py" run --ckpt "${ckpt}" --data-dir "${BASE_PATH}/data" \
    --datasets tiny --seeds ${EVAL_SEEDS} --eval-batch-size 50 --max-prompt-length 128 \
    --max-new-tokens 64 --dev-num "${EVAL_NUM}" --device cpu --log-level WARNING ${EVAL_ARGS} >/dev/null
done
"${PYTHON}" "${BASE_PATH}/code/evaluate.py" compare "${ROWS[@]}" --names "${NAMES[@]}" \
  --out "${OUT}/results" --log-level WARNING
say "done in ${SECONDS}s; checkpoints: ${ROWS[*]}"
