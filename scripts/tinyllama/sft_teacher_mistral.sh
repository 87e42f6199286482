#!/usr/bin/env bash
# LoRA SFT of the Mistral-7B teacher on Dolly: the cross-vocabulary teacher of TinyLLaMA (DSKD-CMA, MinED, ULD, Multi-Level OT, MCW-KD).
# Published values (DSKD scripts/tinyllama/sft_teacher_mistral.sh): batch 8 x accumulation 1
# per GPU, lr 1e-3, 10 epochs, LoRA rank 256 / alpha 8 / dropout 0.1, bf16. The KD scripts use the
# base model plus the adapter this run saves (TEACHER_PEFT_PATH).
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=mistral}"
: "${CKPT_NAME:=mistral-7b-v0.1}"
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
