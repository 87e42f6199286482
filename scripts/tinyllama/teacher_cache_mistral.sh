#!/usr/bin/env bash
# Offline teacher cache of Mistral-7B + its SFT LoRA adapter on Dolly (run once; then every TinyLLaMA
# cross-vocabulary KD script distils from it with TEACHER_CACHE=<dir>, and the 7B teacher never sits
# in GPU memory beside the student). The adapter defaults to the best checkpoint of
# scripts/tinyllama/sft_teacher_mistral.sh. Stores the top-1024 logits (+ tail mass), last hidden
# states, embedding table and head in bf16 (docs/teacher_cache.md).
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
#   bash scripts/tinyllama/teacher_cache_mistral.sh
MCKD_NEEDS_TEACHER=1
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

mckd_tinyllama_pair mistral mistral-7b-v0.1
: "${PRECISION:=bf16}"
: "${CACHE_BATCH_SIZE:=4}"

mckd_teacher_cache
