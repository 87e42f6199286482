"""The shared-string vocabulary map: teacher id -> student id of the token with the same string.

Read by the criteria that compare distributions directly on the part of the vocabularies both
tokenizers share (``uld_hybrid``, ``dual_space_kd_v2``, ``dwa_kd`` with exact alignment, MCW-KD's
``--mcw-exact-kl-weight``). Built once per tokenizer pair and cached under a name derived from both
vocabularies, like the MinED map (:mod:`mckd.data.vocab_map`).

Rules:

1. A teacher token string is rewritten into the student's notation
   (:func:`mckd.data.vocab_map.to_student_notation`: word markers "Ġ" <-> "▁", byte tokens
   ``<0xNN>`` <-> byte-level characters); it matches the student token with exactly that string.
   Between tokenizers of one notation (GPT-2 and Qwen, both byte-level; TinyLLaMA and Mistral, both
   SentencePiece) this is plain string equality, as in GOLD (TRL's ``GOLDTrainer``) and DSKDv2.
2. eos, bos and unk map to their student counterparts when both tokenizers define them.
3. The map is one-to-one: when several teacher ids reach one student id, the smallest teacher id
   keeps it (so that no student probability is counted twice).

Teacher ids without a match map to -1.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from mckd.data.vocab_map import (default_cache_dir, special_token_pairs, to_student_notation,
                                 vocabulary_fingerprint, vocabulary_style, vocabulary_tokens)

logger = logging.getLogger(__name__)


def build_shared_vocab_map(teacher_tokens: list[str], student_tokens: list[str],
                           special_pairs=()) -> list[int]:
    """Teacher id -> student id with the same string (rules 1-3), -1 where none.

    Args:
        teacher_tokens: V_t' token strings, index = teacher id.
        student_tokens: V_s' token strings, index = student id.
        special_pairs: (teacher id, student id) pairs fixed in advance (eos, bos, unk).
    """
    t_style, s_style = vocabulary_style(teacher_tokens), vocabulary_style(student_tokens)
    index: dict[str, int] = {}
    for i, tok in enumerate(student_tokens):
        if tok:
            index.setdefault(tok, i)
    mapping = [-1] * len(teacher_tokens)
    for t_id, s_id in special_pairs:
        if 0 <= t_id < len(mapping):
            mapping[int(t_id)] = int(s_id)
    fixed = {int(t) for t, _ in special_pairs}
    taken = {int(s) for _, s in special_pairs}
    for t_id, tok in enumerate(teacher_tokens):
        if t_id in fixed or not tok:
            continue
        s_id = index.get(to_student_notation(tok, t_style, s_style))
        if s_id is not None and s_id not in taken:
            mapping[t_id] = s_id
            taken.add(s_id)
    return mapping


def load_or_build_shared_vocab_map(teacher_tokenizer, student_tokenizer, *,
                                   cache_dir: str | os.PathLike | None = None) -> tuple[list[int], Path]:
    """The shared-string map of two tokenizers, from the cache or built and cached.

    Returns:
        ``(mapping, cache file)``; ``mapping[t]`` is the student id of teacher id ``t`` or -1.
    """
    t_tokens, s_tokens = vocabulary_tokens(teacher_tokenizer), vocabulary_tokens(student_tokenizer)
    key = vocabulary_fingerprint(t_tokens, s_tokens)
    path = Path(cache_dir or default_cache_dir()) / f"shared_vocab.{key}.json"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
        if isinstance(mapping, list) and len(mapping) == len(t_tokens):
            return mapping, path
        logger.warning("%s: not a shared-vocabulary map of these tokenizers; rebuilding", path)
    mapping = build_shared_vocab_map(t_tokens, s_tokens,
                                     special_pairs=special_token_pairs(teacher_tokenizer, student_tokenizer))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(mapping, f)
    os.replace(tmp, path)
    n = sum(1 for m in mapping if m >= 0)
    logger.info("shared vocabulary: %d of %d teacher ids have a student token with the same string "
                "(cached in %s)", n, len(mapping), path)
    return mapping, path


def shared_id_tensors(mapping, teacher_vocab: int, student_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The matched columns of both logit tensors.

    Args:
        mapping: teacher id -> student id or -1 (ids beyond either logit size are dropped).
        teacher_vocab / student_vocab: V_t, V_s, sizes of the logits.

    Returns:
        ``(teacher_ids, student_ids)``: (K,) long each, teacher ids ascending.
    """
    m = torch.as_tensor(list(mapping)[:teacher_vocab], dtype=torch.long)
    t_ids = torch.nonzero((m >= 0) & (m < student_vocab)).squeeze(1)
    return t_ids, m[t_ids]


def teacher_to_student_tensor(mapping, teacher_vocab: int, student_vocab: int) -> torch.Tensor:
    """(V_t,) long: the student id of every teacher logit column, -1 where none."""
    out = torch.full((teacher_vocab,), -1, dtype=torch.long)
    t_ids, s_ids = shared_id_tensors(mapping, teacher_vocab, student_vocab)
    out[t_ids] = s_ids
    return out
