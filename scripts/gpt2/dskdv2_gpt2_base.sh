#!/usr/bin/env bash
# DSKDv2 with exact token alignment (dual_space_kd_v2) GPT2-base <- SFT'd Qwen1.5-1.8B (different
# vocabularies). Values of the published DSKDv2 script (scripts/dolly/gpt2/run_dskdv2_eta.sh): batch
# 8 x accumulation 1 per GPU, lr 5e-4, 20 epochs, kd rate 0.5, temperature 2.0, forward KL, projector
# lr 5e-4, pseudo-inverse projector initialisation (t2s) and s2t map (the criterion's defaults), bf16.
# The teacher defaults to the best checkpoint of scripts/gpt2/sft_teacher_qwen.sh.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=gpt2}"
: "${CKPT_NAME:=gpt2-base}"
: "${TEACHER_MODEL_TYPE:=qwen}"
: "${TEACHER_MODEL_NAME:=Qwen1.5-1.8B}"
mckd_teacher_sft TEACHER_MODEL_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
  scripts/gpt2/sft_teacher_qwen.sh
: "${TASK:=dual_space_kd_v2}"
: "${CRITERION:=dual_space_kd_v2}"
: "${BATCH_SIZE:=8}"
: "${GRAD_ACC:=1}"
: "${LR:=5e-4}"
: "${EPOCH:=20}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=2.0}"
: "${PROJECTOR_CONFIG_PATH:=${BASE_PATH}/configs/projector_config.json}"
: "${PROJECTOR_LR:=5e-4}"
: "${CRITERION_ARGS:=--dskdv2-s2t pinv --dskdv2-projector-init pinv}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=bf16}"

mckd_train
