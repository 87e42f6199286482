#!/usr/bin/env bash
# DSKD with cross-model attention (dual_space_kd_with_cma) TinyLLaMA-1.1B <- Mistral-7B (different
# vocabularies). Published values (DSKD scripts/tinyllama/dskd_cma_tinyllama.sh): batch 4 x
# accumulation 2 per GPU, lr 1e-3, 10 epochs, kd rate 0.5, temperature 2.0, projector lr 1e-3,
# LoRA 256/8/0.1, bf16.
# The teacher is the base model plus the LoRA adapter of scripts/tinyllama/sft_teacher_mistral.sh (its best checkpoint
# by default, TEACHER_PEFT_PATH); the student is trained with LoRA and gradient checkpointing.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

mckd_tinyllama_pair mistral mistral-7b-v0.1
: "${TASK:=dual_space_kd_with_cma}"
: "${CRITERION:=dual_space_kd_with_cma}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
: "${LR:=1e-3}"
: "${EPOCH:=10}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=2.0}"
: "${LORA_RANK:=256}"
: "${LORA_ALPHA:=8}"
: "${LORA_DROPOUT:=0.1}"
: "${PROJECTOR_CONFIG_PATH:=${BASE_PATH}/configs/projector_config.json}"
: "${PROJECTOR_LR:=1e-3}"
: "${EVAL_BATCH_SIZE:=16}"
: "${PRECISION:=bf16}"
: "${GRAD_CKPT:=1}"

mckd_train
