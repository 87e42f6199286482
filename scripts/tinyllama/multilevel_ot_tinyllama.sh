#!/usr/bin/env bash
# Multi-Level OT (multi_level_ot) TinyLLaMA-1.1B <- Mistral-7B (different vocabularies). Only the
# MCW repository has this baseline; its LLM values (MCW scripts/tinyllama/MultiLevelOT.sh):
# batch 4 x accumulation 2 per GPU (2 GPUs), lr 1e-3, 15 epochs, kd rate 0.5, LoRA 256/8/0.1, bf16,
# log every 50 steps. MLOT_VARIANT=fixed|published selects our fixed formulas or the published ones.
# The teacher is the base model plus the LoRA adapter of scripts/tinyllama/sft_teacher_mistral.sh (its best checkpoint
# by default, TEACHER_PEFT_PATH); the student is trained with LoRA and gradient checkpointing.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

mckd_tinyllama_pair mistral mistral-7b-v0.1
: "${TASK:=multi_level_ot}"
: "${CRITERION:=multi_level_ot}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
: "${LR:=1e-3}"
: "${EPOCH:=15}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=3.0}"
: "${LORA_RANK:=256}"
: "${LORA_ALPHA:=8}"
: "${LORA_DROPOUT:=0.1}"
: "${EVAL_BATCH_SIZE:=16}"
: "${PRECISION:=bf16}"
: "${GRAD_CKPT:=1}"
: "${MLOT_VARIANT:=fixed}"
CRITERION_ARGS="--mlot-variant ${MLOT_VARIANT} ${CRITERION_ARGS:-}"

mckd_train
