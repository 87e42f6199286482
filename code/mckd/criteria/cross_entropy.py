"""``cross_entropy``: supervised fine-tuning, no teacher.

Loss = sum over label tokens of ``-log p(y)`` (fp32), with optional label smoothing
(``--label-smoothing``, done as in :func:`torch.nn.functional.cross_entropy`; the published code
multiplied the NLL by the token count when smoothing was on).
"""
from __future__ import annotations

import torch

from mckd.criteria.base import Criterion, CriterionOutput, ModelDims, ModelView, register_criterion
from mckd.criteria.common import count_tokens, cross_entropy_sum, token_accuracy
from mckd.criteria.options import CriterionOptions, KDOptions


def sft_terms(logits: torch.Tensor, labels: torch.Tensor,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE token sum and the standard metrics every criterion logs.

    Args:
        logits: (B, T_s, V_s) student logits.
        labels: (B, T_s) shifted labels, ``-100`` = ignored.
        label_smoothing: eps.

    Returns:
        ``(ce_sum, metrics)`` with metrics ``nll_loss`` (token sum) and ``accuracy`` (count).
    """
    ce, nll = cross_entropy_sum(logits, labels, label_smoothing)
    return ce, {"nll_loss": nll.detach(), "accuracy": token_accuracy(logits.detach(), labels)}


@register_criterion("cross_entropy")
class CrossEntropy(Criterion):
    """Plain token-summed cross-entropy of the student."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    option_groups = (KDOptions,)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims, resources=None) -> "CrossEntropy":
        return cls(label_smoothing=options[KDOptions].label_smoothing)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None = None) -> CriterionOutput:
        labels = batch["labels"]
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing)
        metrics["loss"] = ce.detach()
        return CriterionOutput(ce, count_tokens(labels), metrics)
