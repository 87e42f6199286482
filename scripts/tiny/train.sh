#!/usr/bin/env bash
# One training stage of the embedded default (scripts/tiny/run.sh calls it; usable alone).
# The same launcher library and entry point as scripts/gpt2 and scripts/tinyllama, with defaults
# sized for the tiny models of model_hub/tiny (built by `python -m mckd.tiny.build`) on CPU.
#   MODEL=teacher CRITERION=cross_entropy bash scripts/tiny/train.sh     # SFT of the teacher
#   CRITERION=mcw_kd TEACHER_MODEL_PATH=<ckpt> bash scripts/tiny/train.sh  # distil the student
# MODEL: student | teacher | teacher_same_vocab (directory under model_hub/tiny).
# The teacher of a KD criterion must be given (TEACHER_MODEL_PATH, TEACHER_MODEL_NAME); KD_RATE,
# KD_TEMP and METHOD_FLAGS default to the CRITERION's row of scripts/tiny/methods.tsv; the
# projector config and the MinED vocabulary map are set from CRITERION. Everything can be
# overridden from the environment; launch options: scripts/lib/common.sh.
: "${GPUS=}"                       # CPU unless GPUS is set
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # tiny matrices: extra threads only spin
: "${DATA_DIR:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/data/tiny}"
: "${MAX_LENGTH:=192}"
: "${MAX_PROMPT_LENGTH:=128}"
: "${DEV_NUM:=100}"
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${MODEL:=student}"
: "${CKPT_TYPE:=tiny}"
: "${CKPT_NAME:=${MODEL}}"
: "${MODEL_TYPE:=$([[ "${MODEL}" == teacher ]] && echo llama || echo gpt2)}"
: "${CRITERION:=cross_entropy}"
: "${TASK:=$([[ "${CRITERION}" == cross_entropy ]] && echo sft || echo "${CRITERION}")}"
: "${BATCH_SIZE:=16}"
: "${GRAD_ACC:=1}"
# students: 4e-3, the better of SFT's dev grid (scripts/tiny/tune.sh); teachers: 2e-3
: "${LR:=$([[ "${MODEL}" == student ]] && echo 4e-3 || echo 2e-3)}"
: "${EPOCH:=3}"
: "${EVAL_BATCH_SIZE:=50}"
: "${LOG_INTERVAL:=50}"
: "${PRECISION:=fp32}"

# A student's defaults: the dev-chosen row of scripts/tiny/methods.tsv whose criterion is CRITERION
row=""
if [[ "${MODEL}" == student ]]; then
  row=$(awk -v c="${CRITERION}" '!/^#/ && $2 == c {print $4, $5, $6; exit}' \
    "${BASE_PATH}/scripts/tiny/methods.tsv")
fi
read -r row_rate row_temp row_flags <<< "${row:-0.5 2.0 -}"
: "${METHOD_FLAGS=$([[ "${row_flags}" == - ]] || echo "${row_flags//,/ }")}"
EXTRA_ARGS="${METHOD_FLAGS:+${METHOD_FLAGS} }${EXTRA_ARGS:-}"

if [[ "${CRITERION}" != cross_entropy ]]; then
  [[ -n "${TEACHER_MODEL_PATH:-}" ]] || mckd_die "CRITERION=${CRITERION} needs TEACHER_MODEL_PATH"
  : "${TEACHER_MODEL_NAME:=$(basename "$(dirname "$(dirname "$(dirname "${TEACHER_MODEL_PATH}")")")")}"
  : "${TEACHER_MODEL_TYPE:=$([[ "${TEACHER_MODEL_NAME}" == teacher ]] && echo llama || echo gpt2)}"
  : "${KD_RATE:=${row_rate}}"
  : "${KD_TEMP:=${row_temp}}"
  case "${CRITERION}" in
    dual_space_kd|dual_space_kd_with_cma|mcw_kd)
      : "${PROJECTOR_CONFIG_PATH:=${BASE_PATH}/configs/projector_config.json}"
      : "${PROJECTOR_LR:=1e-3}" ;;
    min_edit_dis_kld)
      : "${CKPT_PATH:=${BASE_PATH}/model_hub/${CKPT_TYPE}/${CKPT_NAME}}"
      : "${TEA2STU_ID_MAP:=${DATA_DIR}/vocab_alignment/${TEACHER_MODEL_NAME}_to_${CKPT_NAME}.json}"
      mckd_vocab_map "${TEA2STU_ID_MAP}" "${TEACHER_MODEL_PATH}" "${CKPT_PATH}" ;;
  esac
fi

mckd_train
