#!/usr/bin/env bash
# ULD (universal_logit_distillation) GPT2-base <- SFT'd Qwen1.5-1.8B (different vocabularies).
# Published values (DSKD scripts/gpt2/uld_gpt2_base.sh): batch 2 x accumulation 4 per
# GPU, lr 5e-4, 20 epochs, kd rate 0.5, bf16 (the temperature is not used by ULD).
# The teacher defaults to the best checkpoint of scripts/gpt2/sft_teacher_qwen.sh.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=gpt2}"
: "${CKPT_NAME:=gpt2-base}"
: "${TEACHER_MODEL_TYPE:=qwen}"
: "${TEACHER_MODEL_NAME:=Qwen1.5-1.8B}"
mckd_teacher_sft TEACHER_MODEL_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
  scripts/gpt2/sft_teacher_qwen.sh
: "${TASK:=uld}"
: "${CRITERION:=universal_logit_distillation}"
: "${BATCH_SIZE:=2}"
: "${GRAD_ACC:=4}"
: "${LR:=5e-4}"
: "${EPOCH:=20}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=2.0}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=bf16}"

mckd_train
