#!/usr/bin/env bash
# Offline teacher cache of the SFT'd Qwen1.5-1.8B teacher on Dolly (run once; then every GPT-2 KD
# script distils from it with TEACHER_CACHE=<dir> instead of running the teacher each step).
# The teacher defaults to the best checkpoint of scripts/gpt2/sft_teacher_qwen.sh. Stores the top-1024
# logits (+ tail mass), last hidden states, embedding table and head in bf16 (docs/teacher_cache.md).
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
#   bash scripts/gpt2/teacher_cache_qwen.sh                # all GPUs (torchrun, one shard set per rank)
#   GPUS= bash scripts/gpt2/teacher_cache_qwen.sh          # CPU
#   TEACHER_CACHE=outputs/teacher_cache/qwen-k256 TOP_K=256 bash scripts/gpt2/teacher_cache_qwen.sh
MCKD_NEEDS_TEACHER=1
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

: "${TEACHER_MODEL_TYPE:=qwen}"
: "${TEACHER_MODEL_NAME:=Qwen1.5-1.8B}"
mckd_teacher_sft TEACHER_MODEL_PATH "${BASE_PATH}/outputs/${TEACHER_MODEL_TYPE}/${TEACHER_MODEL_NAME}/sft" \
  scripts/gpt2/sft_teacher_qwen.sh
: "${PRECISION:=bf16}"   # the GPT-2 KD scripts train in bf16: the teacher runs as it would live

mckd_teacher_cache
