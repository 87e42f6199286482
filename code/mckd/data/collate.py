"""Collation of processed rows into the batch contract of :mod:`mckd.data.batch`.

Dynamic padding: every tensor is padded to the longest sequence *of the batch* (not to
``max_length``), on the right, with the tokenizer's pad id and ``attention_mask`` 0. Ragged
alignment features become padded tensors plus masks (see :mod:`mckd.data.alignment`).
"""
from __future__ import annotations

import numpy as np
import torch

from mckd.data import alignment as al
from mckd.data.batch import IGNORE_INDEX, teacher_key


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
