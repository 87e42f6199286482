"""The contract every training criterion follows, and the registry of criterion names.

The training loop owns the forward passes. For each micro-batch it runs the student (with
gradients) and, when the criterion needs one, the teacher (``no_grad``, eval mode), then calls::

    loss_sum, n_tokens, metrics = criterion(batch, student, teacher)

* ``batch`` is the collator's dict of tensors (see :mod:`mckd.data.batch`).
* ``student`` / ``teacher`` are :class:`ModelView` objects: logits, last hidden state and access to
  the input-embedding table and output head of the model (for projector-based criteria).
* ``loss_sum`` is a scalar *sum over label tokens* (a token-summed loss). Per-sequence terms must be
  converted to the same scale by the criterion (documented per criterion). The loop divides by the
  number of label tokens summed over all micro-batches of the optimizer step and over all ranks, so
  gradient accumulation and data parallelism give the gradient of one large batch.
* ``n_tokens`` is the number of student label tokens (``labels != -100``) of this micro-batch.
* ``metrics`` maps names to scalar tensors that are *token sums* (divided by the global token count
  at log time, like the loss) unless the name starts with ``"stat/"``, in which case the value is a
  per-micro-batch statistic that the loop averages over micro-batches. Never call ``.item()`` here.

A criterion never tokenizes, never calls a model forward, never mutates its inputs and never loops
over the batch in Python. Trainable parts (projectors, heads) are sub-modules of the criterion: the
loop puts them in their own optimizer parameter group (``projector_lr``), wraps them with the student
for DDP/DeepSpeed and saves them in checkpoints. State changed by a rule (not by the optimizer) is a
buffer; anything else the criterion must persist goes through ``extra_state``/``state_dict``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

from mckd.models.view import ModelDims, ModelView  # noqa: F401  (part of the criterion contract)

if TYPE_CHECKING:
    from mckd.criteria.options import CriterionOptions


@dataclass
class CriterionResources:
    """Non-tensor inputs some criteria need at construction (never used per step)."""

    student_tokenizer: object = None
    teacher_tokenizer: object = None
    # --only-save-projector: a run that trains only the projectors (DSKD-CMA then learns from the
    # teacher-to-student CE alone, as published)
    projector_pretraining: bool = False
    # the loaded models, for criteria that initialise parts from their weights (DSKDv2's
    # pseudo-inverse projectors); read at construction only, never kept
    student_model: object = None
    teacher_model: object = None


@dataclass
class CriterionOutput:
    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.loss_sum, self.n_tokens, self.metrics))


class Criterion(nn.Module):
    """Base class of every criterion.

    Class attributes a subclass sets:
        needs_teacher: the loop runs the teacher forward and passes ``teacher``.
        needs_hidden: the loop asks the models for hidden states (``ModelView.hidden``).
        alignment: names of alignment features the data pipeline must deliver in the batch
            (see :mod:`mckd.data.alignment`), e.g. ``("mined_dtw",)``.
        cross_tokenizer: True when teacher and student may use different tokenizers (a teacher
            criterion without it needs both to share one vocabulary, checked at start).
        published_combination: how ``--loss-combination published`` combines CE and KD
            (``interpolate``: (1 - rate) CE + rate KD, so the rate must be <= 1; ``additive``).
        teacher_modules: teacher parts read besides logits and hidden states, of
            ``("embed_tokens", "lm_head")``; an offline teacher cache must hold them (checked at
            start-up).
        teacher_ranks: (instance) how many of the teacher's largest logits per position the
            criterion reads one by one, ranked (e.g. an OT over the top-k probabilities); a top-k
            teacher cache must store at least that many (checked at start-up). None: no such term.
    """

    needs_teacher: ClassVar[bool] = False
    needs_hidden: ClassVar[bool] = False
    alignment: tuple[str, ...] = ()  # class default; an instance may narrow it from its options
    cross_tokenizer: ClassVar[bool] = False
    published_combination: ClassVar[str] = "additive"
    teacher_modules: ClassVar[tuple[str, ...]] = ()
    teacher_ranks: int | None = None
    # the option groups (frozen dataclasses, :mod:`mckd.criteria.options`) ``from_options`` reads;
    # the command line gets their flags
    option_groups: ClassVar[tuple[type, ...]] = ()

    @classmethod
    def from_options(cls, options: "CriterionOptions", dims: ModelDims,
                     resources: "CriterionResources") -> "Criterion":
        """Build from the run's typed options (the groups listed in ``option_groups``), the model
        sizes and the non-tensor resources."""
        return cls()

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the loop before each optimizer step's micro-batches (optimizer steps, 0-based)."""
        self.step = step
        self.total_steps = total_steps

    def after_optimizer_step(self, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Hook for rule-based state updates (e.g. MCW-KD cost weights) after each optimizer step.

        ``all_reduce_mean`` averages a tensor over ranks so every rank applies the same update.
        Returns scalars to log (may be empty).
        """
        return {}

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Criterion]] = {}


def register_criterion(name: str):
    """Class decorator: ``@register_criterion("dual_space_kd")``."""

    def deco(cls: type[Criterion]) -> type[Criterion]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"criterion name {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def known_criteria() -> list[str]:
    return sorted(_REGISTRY)


def get_criterion_class(name: str) -> type[Criterion]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, known_criteria(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown criterion {name!r}.{hint} Known criteria: {', '.join(known_criteria())}")
    return _REGISTRY[name]
