#!/usr/bin/env bash
# Offline teacher cache of Llama2-7B + its SFT LoRA adapter on Dolly: the same-vocabulary teacher of
# TinyLLaMA (vanilla KD, DSKD; run them with TEACHER_CACHE=<dir>). The adapter defaults to the best
# checkpoint of scripts/tinyllama/sft_teacher_llama2.sh (docs/teacher_cache.md).
# Every value below can be overridden from the environment; launch options: scripts/lib/common.sh.
#   bash scripts/tinyllama/teacher_cache_llama2.sh
MCKD_NEEDS_TEACHER=1
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

mckd_tinyllama_pair llama2 llama2-7b-hf
: "${PRECISION:=bf16}"
: "${CACHE_BATCH_SIZE:=4}"

mckd_teacher_cache
