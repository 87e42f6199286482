#!/usr/bin/env bash
# SFT (full fine-tuning) of the Qwen1.5-1.8B teacher on Dolly: the cross-vocabulary teacher of the
# GPT-2 student. Published values (DSKD scripts/gpt2/sft_teacher_qwen.sh): batch 4 x
# accumulation 2 per GPU, lr 2e-5, 10 epochs, fp16 with ZeRO-2 + CPU optimizer offload.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
#   bash scripts/gpt2/sft_teacher_qwen.sh                 # all GPUs
#   GPUS=0,1 LR=1e-5 bash scripts/gpt2/sft_teacher_qwen.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=qwen}"
: "${CKPT_NAME:=Qwen1.5-1.8B}"
: "${TASK:=sft}"
: "${CRITERION:=cross_entropy}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
: "${LR:=2e-5}"
: "${EPOCH:=10}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=fp16}"
: "${DS_CONFIG:=${BASE_PATH}/configs/deepspeed/ds_config_zero2_offload.json}"

mckd_train
