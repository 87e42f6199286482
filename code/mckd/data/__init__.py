"""Data pipeline: jsonl -> examples -> tokenised (cached) -> alignment (cached) -> padded batches.

Public entry points (imported lazily so ``import mckd.data`` stays cheap)::

    build_dataset(path, *, student_tokenizer, teacher_tokenizer=None, max_length=512,
                  max_prompt_length=256, alignment=(), cache_dir=None, num_proc=1, limit=-1)
    DistillCollator(student_pad_id, teacher_pad_id=None, alignment=())
    build_batch(prompts, responses, *, student_tokenizer, teacher_tokenizer=None, alignment=(),
                max_length=512, max_prompt_length=256, example_index=None, markers=None,
                drop_unlabeled=False)          # the same batch from raw text
    build_prompt_dataset(path, tokenizer, max_prompt_length=256, limit=-1)
    PromptCollator(pad_id)
"""
from __future__ import annotations

_LAZY = {
    "build_dataset": "mckd.data.dataset",
    "DistillDataset": "mckd.data.dataset",
    "DistillCollator": "mckd.data.collate",
    "build_batch": "mckd.data.collate",
    "build_prompt_dataset": "mckd.data.prompts",
    "PromptCollator": "mckd.data.prompts",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mckd.data' has no attribute {name!r}")
