#!/usr/bin/env bash
# MinED (min_edit_dis_kld) GPT2-base <- SFT'd Qwen1.5-1.8B (different vocabularies). Published
# values (DSKD scripts/gpt2/minedit_gpt2_base.sh): batch 4 x accumulation 2 per GPU,
# lr 5e-4, 20 epochs, kd rate 0.5, temperature 2.0, bf16. The teacher->student vocabulary map
# (TEA2STU_ID_MAP) is built with `python -m mckd.data.vocab_map` when it is missing.
# The teacher defaults to the best checkpoint of scripts/gpt2/sft_teacher_qwen.sh.
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${CKPT_TYPE:=gpt2}"
: "${CKPT_NAME:=gpt2-base}"
: "${CKPT_PATH:=${BASE_PATH}/model_hub/${CKPT_TYPE}/${CKPT_NAME}}"
: "${TEACHER_MODEL_TYPE:=qwen}"
: "${TEACHER_MODEL_NAME:=Qwen1.5-1.8B}"
mckd_teacher_sft TEACHER_MODEL_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
  scripts/gpt2/sft_teacher_qwen.sh
: "${TASK:=min_edit}"
: "${CRITERION:=min_edit_dis_kld}"
: "${BATCH_SIZE:=4}"
: "${GRAD_ACC:=2}"
: "${LR:=5e-4}"
: "${EPOCH:=20}"
: "${KD_RATE:=0.5}"
: "${KD_TEMP:=2.0}"
: "${EVAL_BATCH_SIZE:=32}"
: "${PRECISION:=bf16}"
: "${TEA2STU_ID_MAP:=${BASE_PATH}/data/vocab_alignment/qwen_to_gpt2/tea2stu_id_mapping.json}"
mckd_vocab_map "${TEA2STU_ID_MAP}" "${TEACHER_MODEL_PATH}" "${CKPT_PATH}"

mckd_train
