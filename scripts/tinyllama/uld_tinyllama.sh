#!/usr/bin/env bash
# ULD (universal_logit_distillation) TinyLLaMA-1.1B <- Mistral-7B (different vocabularies).
# Published values (DSKD scripts/tinyllama/uld_tinyllama.sh): batch 2 x accumulation 4
# per GPU, lr 1e-3, 10 epochs, kd rate 0.5, LoRA 256/8/0.1, bf16 (the temperature is not used by ULD).
# The teacher is the base model plus the LoRA adapter of scripts/tinyllama/sft_teacher_mistral.sh (its best checkpoint
# by default, TEACHER_PEFT_PATH); the student is trained with LoRA and gradient checkpointing.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

mckd_tinyllama_pair mistral mistral-7b-v0.1
: "${TASK:=uld}"
: "${CRITERION:=universal_logit_distillation}"
: "${BATCH_SIZE:=2}"
: "${GRAD_ACC:=4}"
: "${LR:=1e-3}"
: "${EPOCH:=10}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=2.0}"
: "${LORA_RANK:=256}"
: "${LORA_ALPHA:=8}"
: "${LORA_DROPOUT:=0.1}"
: "${EVAL_BATCH_SIZE:=16}"
: "${PRECISION:=bf16}"
: "${GRAD_CKPT:=1}"

mckd_train
