#!/usr/bin/env bash
# DSKD (dual_space_kd) GPT2-base <- SFT'd GPT2-1.5B (same vocabulary). Published values (DSKD
# scripts/gpt2/dskd_gpt2_base.sh): batch 4 x accumulation 2 per GPU, lr 5e-4, 20 epochs,
# kd rate 0.5, temperature 2.0, projector lr 1e-3, bf16.
# The teacher defaults to the best checkpoint of `CKPT_NAME=gpt2-xlarge bash scripts/gpt2/sft_gpt2_base.sh`.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=gpt2}"
: "${CKPT_NAME:=gpt2-base}"
: "${TEACHER_MODEL_TYPE:=gpt2}"
: "${TEACHER_MODEL_NAME:=gpt2-xlarge}"
mckd_teacher_sft TEACHER_MODEL_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
  "CKPT_NAME=gpt2-xlarge scripts/gpt2/sft_gpt2_base.sh"
: "${TASK:=dual_space_kd}"
: "${CRITERION:=dual_space_kd}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
: "${LR:=5e-4}"
: "${EPOCH:=20}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=2.0}"
: "${PROJECTOR_CONFIG_PATH:=${BASE_PATH}/configs/projector_config.json}"
: "${PROJECTOR_LR:=1e-3}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=bf16}"

mckd_train
