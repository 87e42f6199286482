"""``cross_entropy``: supervised fine-tuning, no teacher.

Loss = sum over label tokens of ``-log p(y)`` (fp32), with optional label smoothing
(``--label-smoothing``, done as in :func:`torch.nn.functional.cross_entropy`; the published code
multiplied the NLL by the token count when smoothing was on).
"""
from __future__ import annotations

import torch

from mckd.criteria.base import Criterion, CriterionOutput, ModelDims, ModelView, register_criterion
from mckd.criteria.common import count_tokens, cross_entropy_sum, is_on_policy, token_accuracy
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions


def sft_terms(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
              batch: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE token sum and the standard metrics every criterion logs.

    Args:
        logits: (B, T_s, V_s) student logits.
        labels: (B, T_s) shifted labels, ``-100`` = ignored.
        label_smoothing: eps.
        batch: the criterion's batch; when it is an on-policy batch (``batch["on_policy"]`` true:
            the responses are the student's own samples, see :mod:`mckd.train.on_policy`) the
            returned CE is 0 (times the CE, so the graph is the same): there is no reference to
            imitate, only the teacher's distributions on those tokens (GKD). The metrics still
            measure the student's NLL of its samples.

    Returns:
        ``(ce_sum, metrics)`` with metrics ``nll_loss`` (token sum) and ``accuracy`` (count).
    """
    ce, nll = cross_entropy_sum(logits, labels, label_smoothing)
    if batch is not None and is_on_policy(batch):
        ce = ce * 0.0
    return ce, {"nll_loss": nll.detach(), "accuracy": token_accuracy(logits.detach(), labels)}


@register_criterion("cross_entropy")
class CrossEntropy(Criterion):
    """Plain token-summed cross-entropy of the student."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = KD_DEFAULTS.label_smoothing):
        super().__init__()
        self.label_smoothing = label_smoothing

    option_groups = (KDOptions,)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims, resources=None) -> "CrossEntropy":
        return cls(label_smoothing=options[KDOptions].label_smoothing)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None = None) -> CriterionOutput:
        labels = batch["labels"]
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        metrics["loss"] = ce.detach()
        return CriterionOutput(ce, count_tokens(labels), metrics)
