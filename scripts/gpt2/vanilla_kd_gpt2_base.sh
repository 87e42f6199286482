#!/usr/bin/env bash
# Vanilla KD (various_divergence, forward KL by default) GPT2-base <- SFT'd GPT2-1.5B (same
# vocabulary). Published values (DSKD scripts/gpt2/vanilla_kd_gpt2_base.sh): batch 4 x
# accumulation 2 per GPU, lr 5e-4, 20 epochs, kd rate 0.5, temperature 2.0, bf16. Unlike the
# published script, --model-type/--teacher-model-type are passed (the family itself is read from config.json).
# The teacher defaults to the best checkpoint of `CKPT_NAME=gpt2-xlarge bash scripts/gpt2/sft_gpt2_base.sh`.
# Every value below can be overridden from the environment (KD_OBJ=reverse_kl, ...); launch
# options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=gpt2}"
: "${CKPT_NAME:=gpt2-base}"
: "${TEACHER_MODEL_TYPE:=gpt2}"
: "${TEACHER_MODEL_NAME:=gpt2-xlarge}"
mckd_teacher_sft TEACHER_MODEL_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
  "CKPT_NAME=gpt2-xlarge scripts/gpt2/sft_gpt2_base.sh"
: "${TASK:=vanilla_kd}"
: "${CRITERION:=various_divergence}"
: "${KD_OBJ:=forward_kl}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
: "${LR:=5e-4}"
: "${EPOCH:=20}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=2.0}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=bf16}"

mckd_train
