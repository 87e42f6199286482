"""Collation of processed rows into the batch contract of :mod:`mckd.data.batch`.

Dynamic padding: every tensor is padded to the longest sequence *of the batch* (not to
``max_length``), on the right, with the tokenizer's pad id and ``attention_mask`` 0. Ragged
alignment features become padded tensors plus masks (see :mod:`mckd.data.alignment`).

:func:`build_batch` makes the same batch from raw text (prompts and responses held in memory),
through the same per-example code as the cached dataset and this collator.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mckd.data import alignment as al
from mckd.data.batch import IGNORE_INDEX, teacher_key
from mckd.data.dataset import _process_batch, check_pipeline_options


def _pad_side(rows: list[dict], prefix: str, pad_id: int) -> dict[str, np.ndarray]:
    """Pad one side (student ``""`` or teacher ``"teacher_"``) of a list of rows."""
    lens = [len(r[prefix + "input_ids"]) for r in rows]
    B, T = len(rows), max(lens)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    offsets = np.zeros((B, T, 2), dtype=np.int64)
    for b, (r, n) in enumerate(zip(rows, lens)):
        input_ids[b, :n] = r[prefix + "input_ids"]
        labels[b, :n] = r[prefix + "labels"]
        if n:
            offsets[b, :n] = np.asarray(r[prefix + "offsets"], dtype=np.int64).reshape(n, 2)
    mask = (np.arange(T)[None, :] < np.asarray(lens)[:, None]).astype(np.int64)  # (B, T)
    position_ids = np.where(mask == 1, np.arange(T)[None, :], 0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
            "labels": labels, "offsets": offsets}


class DistillCollator:
    """``collate(rows) -> dict[str, Tensor]`` with exactly the keys of :mod:`mckd.data.batch`.

    Args:
        student_pad_id: pad id of the student tokenizer.
        teacher_pad_id: pad id of the teacher tokenizer; ``None`` when there is no teacher (no
            ``teacher_*`` keys are produced).
        alignment: alignment feature names to collate (must have been computed by
            :func:`mckd.data.build_dataset` with the same names).
    """

    def __init__(self, student_pad_id: int, teacher_pad_id: int | None = None, alignment=()):
        if student_pad_id is None:
            raise ValueError("DistillCollator: student_pad_id is None (load the tokenizer with "
                             "mckd.models.tokenizers.load_tokenizer, which sets pad := eos)")
        self.student_pad_id = int(student_pad_id)
        self.teacher_pad_id = None if teacher_pad_id is None else int(teacher_pad_id)
        self.alignment = al.check_alignment_names(alignment)
        if self.alignment and self.teacher_pad_id is None:
            raise ValueError(f"DistillCollator(alignment={list(self.alignment)}) needs teacher_pad_id")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("DistillCollator: empty batch")
        missing = [k for k in self._required_keys() if k not in rows[0]]
        if missing:
            raise KeyError(f"DistillCollator: rows lack {missing}; build the dataset with the same "
                           "teacher tokenizer and alignment names as the collator")
        out = {k: torch.from_numpy(v) for k, v in _pad_side(rows, "", self.student_pad_id).items()}
        if self.teacher_pad_id is not None:
            for k, v in _pad_side(rows, "teacher_", self.teacher_pad_id).items():
                out[teacher_key(k)] = torch.from_numpy(v)
        out["example_index"] = torch.tensor([int(r["example_index"]) for r in rows], dtype=torch.long)
        if al.MINED in self.alignment:
            T_s = out["input_ids"].shape[1]
            idx = np.full((len(rows), T_s), -1, dtype=np.int64)
            for b, r in enumerate(rows):
                v = r["mined_teacher_index"]
                idx[b, : len(v)] = v
            out["mined_teacher_index"] = torch.from_numpy(idx)
        if al.DTW in self.alignment:
            out.update(self._collate_dtw(rows))
        if al.EXACT in self.alignment:
            T_s = out["input_ids"].shape[1]
            for key in al.ALIGNMENT_KEYS[al.EXACT]:
                idx = np.full((len(rows), T_s), -1, dtype=np.int64)
                for b, r in enumerate(rows):
                    v = r[key]
                    idx[b, : len(v)] = v
                out[key] = torch.from_numpy(idx)
        return out

    def _required_keys(self) -> list[str]:
        keys = ["input_ids", "labels", "offsets", "example_index"]
        if self.teacher_pad_id is not None:
            keys += [teacher_key(k) for k in ("input_ids", "labels", "offsets")]
        for name in self.alignment:
            keys += [k for k in al.ALIGNMENT_KEYS[name] if k != "dtw_mask"]
        return keys

    @staticmethod
    def _collate_dtw(rows: list[dict]) -> dict[str, torch.Tensor]:
        lens = [len(r["dtw_value"]) for r in rows]
        B, P = len(rows), max(lens)
        index = np.zeros((B, P, 2), dtype=np.int64)
        value = np.zeros((B, P), dtype=np.float32)
        for b, (r, n) in enumerate(zip(rows, lens)):
            if n:
                index[b, :n] = np.asarray(r["dtw_index"], dtype=np.int64).reshape(n, 2)
                value[b, :n] = r["dtw_value"]
        mask = np.arange(P)[None, :] < np.asarray(lens)[:, None]
        return {"dtw_index": torch.from_numpy(index), "dtw_value": torch.from_numpy(value),
                "dtw_mask": torch.from_numpy(mask)}


def build_batch(prompts: Sequence[str], responses: Sequence[str], *, student_tokenizer,
                teacher_tokenizer=None, alignment=(), max_length: int = 512,
                max_prompt_length: int = 256, example_index: Sequence[int] | None = None,
                markers: tuple[str, str] | None = None,
                drop_unlabeled: bool = False) -> dict[str, torch.Tensor]:
    """A training batch from raw text: every tensor the data pipeline gives for these examples.

    Each example goes through the per-example tokenisation and alignment code that
    :func:`mckd.data.build_dataset` caches, and the rows through :class:`DistillCollator`, so the
    result equals collating the cached rows of the same texts with the same options (tokens,
    labels, masks, positions, offsets and every alignment feature). For batches that exist only
    in memory: responses sampled on-policy, external harnesses.

    Args:
        prompts: (B,) prompt texts, already rendered (:attr:`mckd.data.examples.Example.prompt`:
            template applied, ``<n>`` replaced by newlines).
        responses: (B,) response texts (training uses ``Example.outputs[0]``); each side's eos
            token is appended.
        student_tokenizer: the student's fast tokenizer (``mckd.models.tokenizers.load_tokenizer``).
        teacher_tokenizer: the teacher's; ``None`` gives a student-only batch (no ``teacher_*``
            keys, no alignment features).
        alignment: the alignment features the criterion needs (``Criterion.alignment``), names
            from :data:`mckd.data.alignment.KNOWN_ALIGNMENTS`. MinED's vocabulary map is not a
            batch feature: the criterion holds it.
        max_length: the run's ``--max-length`` (tokens of prompt + response + eos per side).
        max_prompt_length: the run's ``--max-prompt-length`` (tail-keeping prompt truncation).
        example_index: the ``example_index`` of each row (default ``0 .. B-1``).
        markers: ``(student, teacher)`` word markers from
            :func:`mckd.data.alignment.feature_markers`; computed from the tokenizers when
            ``None``. Pass them when building many batches with large vocabularies.
        drop_unlabeled: an example whose response is truncated away entirely (no label token on
            the student or the teacher side) is dropped when True, as ``build_dataset`` drops it;
            ``example_index`` of the result names the rows kept. When False it is an error.

    Returns:
        ``dict[str, Tensor]`` with the keys and shapes of :mod:`mckd.data.batch` and
        :mod:`mckd.data.alignment`, padded to the longest sequence of the batch.

    Raises:
        ValueError: empty batch, ``prompts``/``responses``/``example_index`` of different lengths
            or not strings, a dropped example with ``drop_unlabeled=False``, or any option that
            ``build_dataset`` rejects.
    """
    alignment = check_pipeline_options(student_tokenizer, teacher_tokenizer, alignment, max_length,
                                       max_prompt_length, "build_batch")
    prompts, responses = list(prompts), list(responses)
    index = list(range(len(prompts))) if example_index is None else [int(i) for i in example_index]
    if not prompts or len(responses) != len(prompts) or len(index) != len(prompts):
        raise ValueError("build_batch: need as many responses and example_index values as "
                         f"prompts, at least one; got {len(prompts)} prompts, {len(responses)} "
                         f"responses, {len(index)} example_index values")
    for name, texts in (("prompts", prompts), ("responses", responses)):
        bad = [i for i, x in enumerate(texts) if not isinstance(x, str)]
        if bad:
            raise ValueError(f"build_batch: {name}[{bad[0]}] is a {type(texts[bad[0]]).__name__}, "
                             "not a string")
    if markers is None:
        markers = al.feature_markers(student_tokenizer, teacher_tokenizer, alignment)
    positions = list(range(len(prompts)))  # mapped back to ``index`` below
    cols = _process_batch({"prompt": prompts, "output": responses, "example_index": positions},
                          student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
                          max_prompt_length=max_prompt_length, max_length=max_length,
                          alignment=alignment, markers=tuple(markers))
    kept = cols.get("example_index", [])
    if len(kept) < len(prompts) and not drop_unlabeled:
        lost = sorted(set(positions) - set(kept))[0]
        raise ValueError(f"build_batch: the response of example {index[lost]} (row {lost}) is "
                         f"truncated away entirely (max_length={max_length}); shorten its prompt, "
                         "raise max_length, or pass drop_unlabeled=True to drop it as "
                         "build_dataset does")
    if not kept:
        raise ValueError(f"build_batch: every response is truncated away (max_length={max_length})")
    rows = [{k: v[r] for k, v in cols.items()} for r in range(len(kept))]
    for row in rows:
        row["example_index"] = index[row["example_index"]]
    teacher_pad = None if teacher_tokenizer is None else teacher_tokenizer.pad_token_id
    return DistillCollator(student_tokenizer.pad_token_id, teacher_pad, alignment=alignment)(rows)
