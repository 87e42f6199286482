#!/usr/bin/env bash
# LoRA SFT of the TinyLLaMA-1.1B student on Dolly (the SFT baseline). Published values (DSKD
# scripts/tinyllama/sft_tinyllama.sh): batch 8 x accumulation 1 per GPU, lr 1e-3,
# 10 epochs, LoRA rank 256 / alpha 8 / dropout 0.1, bf16.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=tinyllama}"
: "${CKPT_NAME:=tinyllama-1.1b-3T}"
: "${TASK:=sft}"
: "${CRITERION:=cross_entropy}"
: "${BATCH_SIZE:=8}"
: "${GRAD_ACC:=1}"
: "${LR:=1e-3}"
: "${EPOCH:=10}"
: "${LORA_RANK:=256}"
: "${LORA_ALPHA:=8}"
: "${LORA_DROPOUT:=0.1}"
: "${EVAL_BATCH_SIZE:=16}"
: "${PRECISION:=bf16}"

mckd_train
