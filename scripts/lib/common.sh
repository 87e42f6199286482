#!/usr/bin/env bash
# Shared body of every training script (scripts/gpt2, scripts/tinyllama, scripts/tiny).
# Sourced, never run. A script sources this file, sets its defaults with `: "${VAR:=value}"`
# (so every value can be overridden from the environment) and calls `mckd_train`.
#
# Launch (environment variables, all optional):
#   GPUS         GPU ids, comma or space separated. Unset: every GPU nvidia-smi lists.
#                Empty (GPUS=): a CPU run with plain python (NPROC>1: torchrun with gloo).
#   LAUNCHER     torchrun (default, as published) or deepspeed (the DeepSpeed launcher; needed for
#                multi-node with a HOSTFILE).
#   DEEPSPEED    1: train with DeepSpeed (default on GPU, as published), 0: plain torch / DDP.
#   DS_CONFIG    DeepSpeed json (default from PRECISION: ds_config_bf16.json / ds_config.json /
#                ds_config_fp32.json, as published).
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT   multi-node rendezvous (1 / 0 / localhost / 29500).
#   HOSTFILE     hostfile of the deepspeed launcher (multi-node with LAUNCHER=deepspeed).
#   NPROC        CPU processes when GPUS is empty (default 1).
#   PYTHON       python executable (default: python).
#   RESUME=1     continue the run in SAVE_PATH (passes --resume).
#   OVERWRITE=1  start a new run in an existing, non-empty SAVE_PATH: the old run is moved aside
#                whole to SAVE_PATH.old-<date> first (refused while a live run holds it).
#   DRY_RUN=1    print the training command (one line, shell-quoted) and exit without running.
#   EXTRA_ARGS   extra flags appended to the command (word-split), e.g. EXTRA_ARGS="--max-steps 10";
#                flags after the script name are appended too: bash <script>.sh --max-steps 10.
#   TEACHER_CACHE  KD scripts: distil from this offline teacher cache (--teacher-cache; built by the
#                teacher_cache_*.sh script next to the teacher's SFT script) instead of running the
#                teacher: no teacher checkpoint is needed and its weights are never loaded.
#                teacher_cache_*.sh: where the cache is written (default under outputs/teacher_cache).
# Output: SAVE_PATH=${BASE_PATH}/outputs/${CKPT_TYPE}/${CKPT_NAME}/${TASK}/${SETTING} (published
# layout); the run's own log is train.log there, the full console output goes to console.log.
set -euo pipefail

MCKD_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${BASE_PATH:=$(cd "${MCKD_LIB_DIR}/../.." && pwd)}"

# ---------------------------------------------------------------- launch defaults
if [[ -z "${GPUS+set}" ]]; then
  GPUS=$(command -v nvidia-smi >/dev/null 2>&1 \
         && nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - || true)
fi
GPUS=$(echo "${GPUS}" | tr ' ' ',' | sed 's/,,*/,/g; s/^,//; s/,$//')
if [[ -n "${GPUS}" ]]; then
  GPUS_PER_NODE=$(echo "${GPUS}" | tr ',' '\n' | wc -l | tr -d ' ')
  : "${DEEPSPEED:=1}"
else
  : "${NPROC:=1}"
  GPUS_PER_NODE=${NPROC}
  : "${DEEPSPEED:=0}"
  : "${PRECISION:=fp32}"   # CPU: bf16 autocast is slow and gains nothing at these sizes
fi
: "${LAUNCHER:=torchrun}"
: "${NNODES:=1}"
: "${NODE_RANK:=0}"
: "${MASTER_ADDR:=localhost}"
: "${MASTER_PORT:=29500}"
: "${HOSTFILE:=}"
: "${PYTHON:=python}"
: "${RESUME:=0}"
: "${OVERWRITE:=0}"
: "${DRY_RUN:=0}"
: "${EXTRA_ARGS:=}"
# flags given after the script's name go to the entry point too (after EXTRA_ARGS)
if [[ $# -gt 0 ]]; then EXTRA_ARGS="${EXTRA_ARGS:+${EXTRA_ARGS} }$*"; fi

# ---------------------------------------------------------------- defaults shared by all scripts
# (the options every published script fixed)
: "${DATA_DIR:=${BASE_PATH}/data/dolly}"
: "${MAX_LENGTH:=512}"
: "${MAX_PROMPT_LENGTH:=256}"
: "${DEV_NUM:=1000}"
: "${NUM_WORKERS:=0}"
: "${WARMUP_ITERS:=0}"
: "${LR_DECAY_STYLE:=cosine}"
: "${WEIGHT_DECAY:=1e-2}"
: "${CLIP_GRAD:=1.0}"
: "${SAVE_BEST_N_CKPTS:=1}"
: "${SAVE_INTERVAL:=1}"
: "${EVAL_INTERVAL:=1}"
: "${SEED:=10}"
: "${KD_OBJ:=forward_kl}"
: "${EVAL_GEN:=1}"

export NCCL_DEBUG="${NCCL_DEBUG:-}" WANDB_DISABLED=True TF_CPP_MIN_LOG_LEVEL=3
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONPATH="${BASE_PATH}/code${PYTHONPATH:+:${PYTHONPATH}}"

mckd_log() { echo "[$(basename "${0}")] $*" >&2; }
mckd_die() { echo "[$(basename "${0}")] error: $*" >&2; exit 2; }

# mckd_has_run DIR: true when DIR holds files of a run (the launcher's console.log and command.sh,
# written before the run starts, and the run lock do not count).
mckd_has_run() {
  [[ -d "$1" ]] && ls -A "$1" | grep -qvxE 'console\.log|command\.sh|run\.lock'
}

# mckd_best_ckpt DIR...: best checkpoint under the run directories (empty when none).
mckd_best_ckpt() { "${PYTHON}" "${MCKD_LIB_DIR}/find_checkpoint.py" "$@" || true; }

# mckd_teacher_sft VAR RUN_ROOT SCRIPT: if VAR is empty, set it to the best checkpoint under RUN_ROOT
# (the output of SCRIPT). Missing: an error, or in DRY_RUN a warning and RUN_ROOT itself.
# With TEACHER_CACHE set (a KD run from the cache) no checkpoint is needed; the cache builders set
# MCKD_NEEDS_TEACHER=1 because they run the teacher.
mckd_teacher_sft() {
  local var=$1 root=$2 script=$3 found
  if [[ -n "${!var:-}" ]]; then return 0; fi
  if [[ -n "${TEACHER_CACHE:-}" && "${MCKD_NEEDS_TEACHER:-0}" != 1 ]]; then return 0; fi
  found=$(mckd_best_ckpt "${root}")
  if [[ -z "${found}" ]]; then
    if [[ "${DRY_RUN}" == 1 ]]; then
      mckd_log "warning: no checkpoint under ${root} yet (run ${script} first); showing the run root"
      found=${root}
    else
      mckd_die "no SFT checkpoint under ${root}: run ${script} first, or set ${var}=<checkpoint dir>"
    fi
  fi
  printf -v "${var}" '%s' "${found}"
}

# mckd_tinyllama_pair TEACHER_TYPE TEACHER_NAME: defaults of a TinyLLaMA student distilled from a
# LoRA-SFT'd teacher (base model + the adapter of scripts/tinyllama/sft_teacher_<type>.sh); every
# value stays overridable from the environment.
mckd_tinyllama_pair() {
  : "${CKPT_TYPE:=tinyllama}"
  : "${CKPT_NAME:=tinyllama-1.1b-3T}"
  : "${CKPT_PATH:=${BASE_PATH}/model_hub/${CKPT_TYPE}/${CKPT_NAME}}"
  : "${TEACHER_MODEL_TYPE:=$1}"
  : "${TEACHER_MODEL_NAME:=$2}"
  : "${TEACHER_MODEL_PATH:=${BASE_PATH}/model_hub/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}}"
  mckd_teacher_sft TEACHER_PEFT_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
    "scripts/tinyllama/sft_teacher_${TEACHER_MODEL_TYPE}.sh"
}

# mckd_vocab_map FILE TEACHER STUDENT: build the MinED vocabulary map when FILE is missing.
mckd_vocab_map() {
  local out=$1 teacher=$2 student=$3
  local cmd=("${PYTHON}" -m mckd.data.vocab_map --teacher "${teacher}" --student "${student}" --out "${out}")
  [[ -f "${out}" ]] && return 0
  if [[ "${DRY_RUN}" == 1 ]]; then
    mckd_log "would build the vocabulary map: ${cmd[*]}"
    return 0
  fi
  mkdir -p "$(dirname "${out}")"
  mckd_log "building the vocabulary map ${out}"
  "${cmd[@]}"
}

# mckd_setting: the published SETTING string from the variables that are set.
mckd_setting() {
  local ebs=$(( BATCH_SIZE * GRAD_ACC * GPUS_PER_NODE * NNODES ))
  local config="${KD_OBJ}-${PRECISION}"
  [[ -n "${LORA_RANK:-}" ]] && config="lora-rank=${LORA_RANK}-alpha=${LORA_ALPHA}-dropout=${LORA_DROPOUT}-${PRECISION}"
  local s="criterion=${CRITERION}__${config}"
  [[ -n "${TEACHER_MODEL_NAME:-}" ]] && s+="__teacher=${TEACHER_MODEL_NAME}__kd^rate=${KD_RATE}__kd^temp=${KD_TEMP}"
  s+="__epoch=${EPOCH}__bsz=${BATCH_SIZE}x${GRAD_ACC}x${GPUS_PER_NODE}=${ebs}__lr=${LR}"
  [[ -n "${PROJECTOR_CONFIG_PATH:-}" ]] && s+="__proj^lr=${PROJECTOR_LR}"
  echo "${s}"
}

# mckd_train: build the command from the variables, then print it (DRY_RUN=1) or run it once, in
# the foreground, with the console tee'd to SAVE_PATH/console.log.
mckd_train() {
  : "${CKPT_PATH:=${BASE_PATH}/model_hub/${CKPT_TYPE}/${CKPT_NAME}}"
  : "${EVAL_BATCH_SIZE:=32}"
  : "${LOG_INTERVAL:=50}"
  : "${PRECISION:=bf16}"
  : "${SETTING:=$(mckd_setting)}"
  : "${SAVE_PATH:=${BASE_PATH}/outputs/${CKPT_TYPE}/${CKPT_NAME}/${TASK}/${SETTING}}"

  local opts=(
    --model-path "${CKPT_PATH}" --model-type "${MODEL_TYPE:-${CKPT_TYPE}}"
    --data-dir "${DATA_DIR}" --num-workers "${NUM_WORKERS}" --dev-num "${DEV_NUM}" --task "${TASK}"
    --criterion "${CRITERION}"
    --lr "${LR}" --batch-size "${BATCH_SIZE}" --eval-batch-size "${EVAL_BATCH_SIZE}"
    --gradient-accumulation-steps "${GRAD_ACC}" --warmup-iters "${WARMUP_ITERS}"
    --lr-decay-style "${LR_DECAY_STYLE}" --weight-decay "${WEIGHT_DECAY}" --clip-grad "${CLIP_GRAD}"
    --num-epochs "${EPOCH}" --max-length "${MAX_LENGTH}" --max-prompt-length "${MAX_PROMPT_LENGTH}"
    --save-interval "${SAVE_INTERVAL}" --eval-interval "${EVAL_INTERVAL}"
    --log-interval "${LOG_INTERVAL}" --save-dir "${SAVE_PATH}"
    --keep-best-n-checkpoints "${SAVE_BEST_N_CKPTS}" --seed "${SEED}" --precision "${PRECISION}"
  )
  if [[ "${EVAL_GEN}" == 1 ]]; then
    opts+=(--eval-gen --do-sample --top-k 0 --top-p 1.0 --temperature 1.0)
  fi
  if [[ -n "${TEACHER_CACHE:-}" && -n "${KD_RATE:-}" ]]; then
    # the cache holds the teacher's outputs, config and tokenizer: the teacher is not passed
    opts+=(--teacher-cache "${TEACHER_CACHE}"
           --kd-rate "${KD_RATE}" --kd-temperature "${KD_TEMP}" --kd-objective "${KD_OBJ}")
  elif [[ -n "${TEACHER_MODEL_PATH:-}" ]]; then
    opts+=(--teacher-model-path "${TEACHER_MODEL_PATH}" --teacher-model-type "${TEACHER_MODEL_TYPE}"
           --kd-rate "${KD_RATE}" --kd-temperature "${KD_TEMP}" --kd-objective "${KD_OBJ}")
    [[ -n "${TEACHER_PEFT_PATH:-}" ]] && opts+=(--teacher-peft-path "${TEACHER_PEFT_PATH}")
  fi
  if [[ -n "${LORA_RANK:-}" ]]; then
    opts+=(--peft lora --peft-lora-r "${LORA_RANK}" --peft-lora-alpha "${LORA_ALPHA}"
           --peft-lora-dropout "${LORA_DROPOUT}")
  fi
  if [[ -n "${PROJECTOR_CONFIG_PATH:-}" ]]; then
    opts+=(--projector-config-path "${PROJECTOR_CONFIG_PATH}" --projector-lr "${PROJECTOR_LR}")
  fi
  [[ -n "${TEA2STU_ID_MAP:-}" ]] && opts+=(--teacher-to-student-id-mapping "${TEA2STU_ID_MAP}")
  [[ "${GRAD_CKPT:-0}" == 1 ]] && opts+=(--gradient-checkpointing)
  if [[ -n "${CRITERION_ARGS:-}" ]]; then
    # shellcheck disable=SC2206  # method-specific flags set by the script, word-split on purpose
    opts+=(${CRITERION_ARGS})
  fi
  if [[ "${DEEPSPEED}" == 1 ]]; then
    if [[ -z "${DS_CONFIG:-}" ]]; then
      case "${PRECISION}" in
        bf16) DS_CONFIG=${BASE_PATH}/configs/deepspeed/ds_config_bf16.json ;;
        fp16) DS_CONFIG=${BASE_PATH}/configs/deepspeed/ds_config.json ;;
        fp32) DS_CONFIG=${BASE_PATH}/configs/deepspeed/ds_config_fp32.json ;;
        *) mckd_die "PRECISION=${PRECISION}: expected bf16, fp16 or fp32" ;;
      esac
    fi
    opts+=(--deepspeed --deepspeed_config "${DS_CONFIG}")
  fi
  # console.log and command.sh are written before python starts; python does not count them
  if [[ "${RESUME}" == 1 ]]; then
    opts+=(--resume)
  elif ! mckd_has_run "${SAVE_PATH}"; then
    :  # a fresh run
  elif [[ "${DRY_RUN}" == 1 ]]; then
    mckd_log "warning: ${SAVE_PATH} holds a run; a real run would stop here (or move it aside with OVERWRITE=1)"
  elif [[ "${OVERWRITE}" == 1 ]]; then
    local moved
    moved=$("${PYTHON}" -m mckd.train.rundir set-aside "${SAVE_PATH}") || exit 2
    mckd_log "OVERWRITE=1: the previous run in ${SAVE_PATH} was moved to ${moved}"
  else
    mckd_die "${SAVE_PATH} exists and is not empty: RESUME=1 continues it, OVERWRITE=1 moves it aside and starts anew"
  fi
  if [[ -n "${EXTRA_ARGS}" ]]; then
    # shellcheck disable=SC2206
    opts+=(${EXTRA_ARGS})
  fi

  local entry="${BASE_PATH}/code/distillation.py" cmd
  if [[ -z "${GPUS}" ]]; then
    if [[ "${NPROC}" -gt 1 ]]; then
      cmd=(torchrun --nproc_per_node "${NPROC}" --nnodes "${NNODES}" --node_rank "${NODE_RANK}"
           --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" "${entry}")
    else
      cmd=("${PYTHON}" "${entry}")
    fi
  elif [[ "${LAUNCHER}" == deepspeed ]]; then
    cmd=(deepspeed --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}")
    if [[ -n "${HOSTFILE}" ]]; then
      cmd+=(--hostfile "${HOSTFILE}" --num_nodes "${NNODES}" --num_gpus "${GPUS_PER_NODE}")
    else
      cmd+=(--include "localhost:${GPUS}")
    fi
    cmd+=("${entry}")
  elif [[ "${LAUNCHER}" == torchrun ]]; then
    export CUDA_VISIBLE_DEVICES=${GPUS}
    cmd=(torchrun --nproc_per_node "${GPUS_PER_NODE}" --nnodes "${NNODES}" --node_rank "${NODE_RANK}"
         --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" "${entry}")
  else
    mckd_die "LAUNCHER=${LAUNCHER}: expected torchrun or deepspeed"
  fi
  cmd+=("${opts[@]}")

  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  mkdir -p "${SAVE_PATH}"
  mckd_log "run directory: ${SAVE_PATH}"
  mckd_log "effective batch: ${BATCH_SIZE} x ${GRAD_ACC} x ${GPUS_PER_NODE} x ${NNODES} node(s)"
  { printf '%q ' "${cmd[@]}"; printf '\n'; } >> "${SAVE_PATH}/command.sh"
  cd "${BASE_PATH}"
  "${cmd[@]}" 2>&1 | tee -a "${SAVE_PATH}/console.log"
}

# mckd_teacher_cache: build the offline teacher cache of TEACHER_MODEL_PATH (+ TEACHER_PEFT_PATH) on
# DATA_DIR/train.jsonl (python -m mckd.teacher_cache build), print it (DRY_RUN=1) or run it; a
# rerun resumes an interrupted build. Variables (all overridable): TOP_K (1024), CACHE_DTYPE (bf16),
# PRECISION (dtype the teacher runs in; bf16), CACHE_BATCH_SIZE (8), SHARD_SIZE (256),
# CACHE_STORE (logits,hidden,embed_tokens,lm_head), TEACHER_CACHE (output directory).
mckd_teacher_cache() {
  : "${TOP_K:=1024}"
  : "${CACHE_DTYPE:=bf16}"
  : "${PRECISION:=bf16}"
  : "${CACHE_BATCH_SIZE:=8}"
  : "${SHARD_SIZE:=256}"
  : "${CACHE_STORE:=logits,hidden,embed_tokens,lm_head}"
  : "${TEACHER_CACHE:=${BASE_PATH}/outputs/teacher_cache/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/$(basename "${DATA_DIR}")-L${MAX_LENGTH}-k${TOP_K}-${CACHE_DTYPE}}"
  local opts=(build --teacher-model-path "${TEACHER_MODEL_PATH}" --data-dir "${DATA_DIR}"
              --output "${TEACHER_CACHE}" --max-length "${MAX_LENGTH}" --max-prompt-length "${MAX_PROMPT_LENGTH}"
              --top-k "${TOP_K}" --dtype "${CACHE_DTYPE}" --teacher-dtype "${PRECISION}"
              --batch-size "${CACHE_BATCH_SIZE}" --shard-size "${SHARD_SIZE}" --store "${CACHE_STORE}")
  [[ -n "${TEACHER_PEFT_PATH:-}" ]] && opts+=(--teacher-peft-path "${TEACHER_PEFT_PATH}")
  if [[ -n "${EXTRA_ARGS}" ]]; then
    # shellcheck disable=SC2206
    opts+=(${EXTRA_ARGS})
  fi
  local cmd
  if [[ -z "${GPUS}" && "${NPROC}" -le 1 ]]; then
    cmd=("${PYTHON}" -m mckd.teacher_cache)
  else
    [[ -n "${GPUS}" ]] && export CUDA_VISIBLE_DEVICES=${GPUS}
    cmd=(torchrun --nproc_per_node "${GPUS_PER_NODE}" --nnodes "${NNODES}" --node_rank "${NODE_RANK}"
         --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" -m mckd.teacher_cache)
  fi
  cmd+=("${opts[@]}")
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  mckd_log "teacher cache: ${TEACHER_CACHE}"
  cd "${BASE_PATH}"
  "${cmd[@]}"
  mckd_log "distil from it with: TEACHER_CACHE=${TEACHER_CACHE} bash scripts/<family>/<method>.sh"
}
