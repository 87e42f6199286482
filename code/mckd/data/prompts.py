"""Generation-side data: prompts for the dev evaluation in training and for ``evaluate.py``.

Prompts are tokenised like the training prompts (no special tokens, tail-keeping truncation to
``max_prompt_length``; the evaluation protocol uses prompts of at most 256 tokens) and batched with LEFT padding so
that ``model.generate`` with the KV cache continues every row from its last real token.
"""
from __future__ import annotations

import numpy as np
import torch

from mckd.data.examples import encode_prompt, read_examples


def build_prompt_dataset(path, tokenizer, max_prompt_length: int = 256, limit: int = -1, *,
                         require_references: bool = True) -> list[dict]:
    """Read a jsonl file and tokenise its prompts.

    Args:
        path: jsonl file (the processed schema of :mod:`mckd.data.examples`).
        tokenizer: fast tokenizer of the model that generates.
        max_prompt_length: maximum prompt tokens (the ``### Response:`` tail is always kept).
        limit: keep the first ``limit`` records (-1: all).
        require_references: records must have a non-empty ``output`` (False: prompt-only files).

    Returns:
        list of dicts: ``prompt_ids`` (list[int]), ``prompt`` (str), ``references`` (list[str]),
        ``index`` (row in the file, counting non-empty lines from 0).

    Raises:
        FileNotFoundError / DataFormatError: bad file (file:line in the message).
    """
    if max_prompt_length < 1:
        raise ValueError(f"build_prompt_dataset: max_prompt_length={max_prompt_length} must be >= 1")
    examples = read_examples(path, require_output=require_references, limit=limit)
    return [{"prompt_ids": encode_prompt(tokenizer, e.prompt, max_prompt_length),
             "prompt": e.prompt, "references": list(e.outputs), "index": e.index}
            for e in examples]


class PromptCollator:
    """``collate(rows) -> dict[str, Tensor]`` for batched generation.

    Keys (``T`` = longest prompt of the batch):
        input_ids       (B, T) long   left-padded with ``pad_id``
        attention_mask  (B, T) long   0 on the left padding, 1 on prompt tokens
        position_ids    (B, T) long   ``cumsum(attention_mask) - 1`` clamped at 0 (0 on padding)
        index           (B,)   long   the rows' ``index``
    """

    def __init__(self, pad_id: int):
        if pad_id is None:
            raise ValueError("PromptCollator: pad_id is None (load the tokenizer with "
                             "mckd.models.tokenizers.load_tokenizer, which sets pad := eos)")
        self.pad_id = int(pad_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PromptCollator: empty batch")
        lens = [len(r["prompt_ids"]) for r in rows]
        if min(lens) == 0:
            raise ValueError(f"PromptCollator: row index {rows[lens.index(0)]['index']} has an empty prompt")
        B, T = len(rows), max(lens)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        for b, (r, n) in enumerate(zip(rows, lens)):
            ids[b, T - n:] = r["prompt_ids"]
        mask = (np.arange(T)[None, :] >= (T - np.asarray(lens))[:, None]).astype(np.int64)
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "position_ids": torch.from_numpy(pos),
                "index": torch.tensor([int(r["index"]) for r in rows], dtype=torch.long)}
