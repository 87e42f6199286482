#!/usr/bin/env bash
# The prepared GPU check: every part a real run executes on CUDA (criteria in bf16 against fp32,
# the benchmark targets, 20-step training with plain torch and DeepSpeed ZeRO-2/3 + resume +
# run_eval.sh), in one command and at most 8 minutes on one H100/H200. See BENCHMARKS.md ("GPU check").
#   bash scripts/gpu_check.sh                  # CUDA; results in $OUT (default outputs/gpu_check)
#   DEVICE=cpu bash scripts/gpu_check.sh       # CPU small mode (tiny shapes, a few steps; CI runs it)
#   bash scripts/gpu_check.sh --small --parts env setup criteria
# Environment (all optional):
#   OUT               output folder: summary.md, results.json, logs.txt
#   WORK              scratch folder (models, runs, caches; emptied first; default outputs/gpu_check_work)
#   DEVICE=cpu        the small CPU mode (same as --small)
#   GPU_CHECK_HUB     folder holding gpt2/gpt2-base and qwen/Qwen1.5-1.8B (real tokenizer files and
#                     config.json); default: model_hub/ of the repository, then $MCKD_SHARED/model_hub
#                     and ../shared/model_hub; none: the embedded default's tokenizers
#   GPU_CHECK_WHEELS  folder of wheels installed first (pip --no-index --target, default
#                     .cache/gpu_check_wheels when it exists): packages the machine lacks, e.g. deepspeed
#   GPU_CHECK_TIME_SCALE  multiply every time limit (default 1; the CI test uses 3 on shared cores)
#   PYTHON            python executable (default: python3, else python)
# Extra arguments go to benchmarks/gpu_check.py (--parts, --budget, --jobs, --tokenizers).
set -euo pipefail
BASE_PATH=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${BASE_PATH}"
: "${PYTHON:=$(command -v python3 || command -v python)}"
: "${OUT:=${BASE_PATH}/outputs/gpu_check}"
: "${WORK:=${BASE_PATH}/outputs/gpu_check_work}"
: "${GPU_CHECK_WHEELS:=${BASE_PATH}/.cache/gpu_check_wheels}"
export PYTHON OUT

if compgen -G "${GPU_CHECK_WHEELS}/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/mckd_gpu_check_site"
  echo "[gpu_check] installing the wheels of ${GPU_CHECK_WHEELS} into ${SITE}" >&2
  if "${PYTHON}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "${SITE}" "${GPU_CHECK_WHEELS}"/*.whl; then
    export PYTHONPATH="${SITE}${PYTHONPATH:+:${PYTHONPATH}}"
    export PATH="${SITE}/bin:${PATH}"
  else  # e.g. wheels for another Python: the env part then reports what cannot be imported
    echo "[gpu_check] warning: installing the wheels failed; continuing with the installed packages" >&2
  fi
fi

ARGS=(--out "${OUT}" --work "${WORK}")
[[ "${DEVICE:-}" == cpu ]] && ARGS+=(--small)
exec "${PYTHON}" "${BASE_PATH}/benchmarks/gpu_check.py" "${ARGS[@]}" "$@"
