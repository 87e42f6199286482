"""What a criterion sees of a model: one forward's outputs with the embedding table and output
head (:class:`ModelView`), and the sizes read from the model configs (:class:`ModelDims`).

Both the models layer (which builds views, :mod:`mckd.models.access`) and the criteria (which read
them) import this module; it imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelView:
    """What a criterion may see of one model for one micro-batch.

    Attributes:
        logits: (B, T, V) output logits (any dtype; criteria upcast to fp32 where it matters).
        hidden: (B, T, D) last-layer hidden states, or None when the criterion did not ask for them.
        embed_tokens: the model's input embedding module (token ids -> (.., D)).
        lm_head: the model's output projection module ((.., D) -> (.., V)).
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None
    embed_tokens: nn.Module
    lm_head: nn.Module

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, D) output-head weight."""
        w = getattr(self.lm_head, "weight", None)
        if w is None:
            raise ValueError(f"ModelView: the output head {self.lm_head!r} has no weight (a teacher "
                             "cache built without lm_head?); declare it in Criterion.teacher_modules")
        return w


@dataclass
class ModelDims:
    """Sizes read from the model configs (never passed by hand)."""

    student_hidden: int
    student_vocab: int
    teacher_hidden: int | None = None
    teacher_vocab: int | None = None
