#!/usr/bin/env bash
# SFT of the GPT2-base student (full fine-tuning) on Dolly: the SFT baseline, and, with
# CKPT_NAME=gpt2-xlarge, the SFT of the same-vocabulary GPT2-1.5B teacher. Published values (DSKD
# scripts/gpt2/sft_gpt2_base.sh): batch 4 x accumulation 2 per GPU, lr 5e-4, 20 epochs, bf16.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
#   bash scripts/gpt2/sft_gpt2_base.sh
#   CKPT_NAME=gpt2-xlarge LR=1e-4 bash scripts/gpt2/sft_gpt2_base.sh   # the vanilla KD / DSKD teacher
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=gpt2}"
: "${CKPT_NAME:=gpt2-base}"
: "${TASK:=sft}"
: "${CRITERION:=cross_entropy}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
: "${LR:=5e-4}"
: "${EPOCH:=20}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=bf16}"

mckd_train
