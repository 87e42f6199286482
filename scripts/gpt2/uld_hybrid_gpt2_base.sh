#!/usr/bin/env bash
# GOLD's hybrid ULD (uld_hybrid) GPT2-base <- SFT'd Qwen1.5-1.8B (different vocabularies): KL on the
# shared-string part of the vocabularies, sorted-probability L1 on the rest, over exactly aligned
# token groups. Training values of the ULD baseline (batch 2 x accumulation 4 per GPU, lr 5e-4,
# 20 epochs, bf16) with GOLD's temperature 1 and loss CE + 1.0 x hybrid (KD_RATE); the hybrid's own
# weights default to GOLD's adaptive K / V_t (CRITERION_ARGS="--uld-hybrid-matched-weight 0.9
# --uld-hybrid-unmatched-weight 0.1" fixes them).
# The teacher defaults to the best checkpoint of scripts/gpt2/sft_teacher_qwen.sh.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=gpt2}"
: "${CKPT_NAME:=gpt2-base}"
: "${TEACHER_MODEL_TYPE:=qwen}"
: "${TEACHER_MODEL_NAME:=Qwen1.5-1.8B}"
mckd_teacher_sft TEACHER_MODEL_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
  scripts/gpt2/sft_teacher_qwen.sh
: "${TASK:=uld_hybrid}"
: "${CRITERION:=uld_hybrid}"
: "${BATCH_SIZE:=2}"
: "${GRAD_ACC:=4}"
: "${LR:=5e-4}"
: "${EPOCH:=20}"
: "${KD_RATE:=1.0}"
: "${KD_TEMP:=1.0}"
: "${CRITERION_ARGS:=--uld-hybrid-positions groups --uld-hybrid-beta 0.0}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=bf16}"

mckd_train
