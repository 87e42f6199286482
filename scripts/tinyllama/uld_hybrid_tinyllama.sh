#!/usr/bin/env bash
# GOLD's hybrid ULD (uld_hybrid) TinyLLaMA-1.1B <- Mistral-7B (different vocabularies). Training
# values of the ULD TinyLLaMA baseline (batch 2 x accumulation 4 per GPU, lr 1e-3, 10 epochs, LoRA
# 256/8/0.1, bf16) with GOLD's temperature 1 and loss CE + 1.0 x hybrid (KD_RATE).
# The teacher is the base model plus the LoRA adapter of scripts/tinyllama/sft_teacher_mistral.sh.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

mckd_tinyllama_pair mistral mistral-7b-v0.1
: "${TASK:=uld_hybrid}"
: "${CRITERION:=uld_hybrid}"
: "${BATCH_SIZE:=2}"
: "${GRAD_ACC:=4}"
: "${LR:=1e-3}"
: "${EPOCH:=10}"
: "${KD_RATE:=1.0}"
: "${KD_TEMP:=1.0}"
: "${LORA_RANK:=256}"
: "${LORA_ALPHA:=8}"
: "${LORA_DROPOUT:=0.1}"
: "${CRITERION_ARGS:=--uld-hybrid-positions groups --uld-hybrid-beta 0.0}"
: "${EVAL_BATCH_SIZE:=16}"
: "${PRECISION:=bf16}"
: "${GRAD_CKPT:=1}"

mckd_train
