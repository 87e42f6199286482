#!/usr/bin/env bash
# MinED (min_edit_dis_kld) TinyLLaMA-1.1B <- Mistral-7B (different vocabularies). Published values
# (DSKD scripts/tinyllama/minedit_tinyllama.sh): batch 4 x accumulation 2 per GPU, lr 1e-3,
# 10 epochs, kd rate 0.5, temperature 2.0, LoRA 256/8/0.1, bf16. The teacher->student vocabulary map
# (TEA2STU_ID_MAP) is built with `python -m mckd.data.vocab_map` when it is missing (the published
# MCW script omitted it and crashed).
# The teacher is the base model plus the LoRA adapter of scripts/tinyllama/sft_teacher_mistral.sh (its best checkpoint
# by default, TEACHER_PEFT_PATH); the student is trained with LoRA and gradient checkpointing.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

mckd_tinyllama_pair mistral mistral-7b-v0.1
: "${TASK:=min_edit}"
: "${CRITERION:=min_edit_dis_kld}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
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
: "${TEA2STU_ID_MAP:=${BASE_PATH}/data/vocab_alignment/mistral_to_tinyllama/tea2stu_id_mapping.json}"
mckd_vocab_map "${TEA2STU_ID_MAP}" "${TEACHER_MODEL_PATH}" "${CKPT_PATH}"

mckd_train
