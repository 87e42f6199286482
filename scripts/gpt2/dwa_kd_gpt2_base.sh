#!/usr/bin/env bash
# DWA-KD (dwa_kd) GPT2-base <- SFT'd Qwen1.5-1.8B (different vocabularies): entropy-weighted
# dual-space KD (cross-model attention) plus Soft-DTW divergences of label embeddings and last hidden
# states. DWA-KD's scripts are not public: the values are those of the DSKD-CMA baseline it builds
# on (batch 4 x accumulation 2 per GPU, lr 5e-4, 20 epochs, kd rate 0.5, temperature 2.0, projector
# lr 1e-3, bf16) with the criterion's Soft-DTW defaults (rate 1.0, gamma 1.0).
# The teacher defaults to the best checkpoint of scripts/gpt2/sft_teacher_qwen.sh.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=gpt2}"
: "${CKPT_NAME:=gpt2-base}"
: "${TEACHER_MODEL_TYPE:=qwen}"
: "${TEACHER_MODEL_NAME:=Qwen1.5-1.8B}"
mckd_teacher_sft TEACHER_MODEL_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
  scripts/gpt2/sft_teacher_qwen.sh
: "${TASK:=dwa_kd}"
: "${CRITERION:=dwa_kd}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
: "${LR:=5e-4}"
: "${EPOCH:=20}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=2.0}"
: "${PROJECTOR_CONFIG_PATH:=${BASE_PATH}/configs/projector_config.json}"
: "${PROJECTOR_LR:=1e-3}"
: "${CRITERION_ARGS:=--dwa-token-alignment cma --dwa-dtw-rate 1.0 --dwa-gamma 1.0}"
: "${GRAD_CKPT:=1}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=bf16}"

mckd_train
