"""``various_divergence``: vanilla logit KD between models sharing one tokenizer.

    loss = combine(CE_sum, sum_{labels != -100} D(p_s, p_t))

``D`` is ``--kd-objective`` (:mod:`mckd.criteria.divergences`), with temperature
``--kd-temperature`` on both sides and optional tau^2 scaling (``--kd-temperature-scaling``).
``combine`` is ``(1 - l) CE + l KD`` as published, or ``CE + l KD`` with
``--loss-combination additive``. Teacher and student positions must coincide (same tokenizer);
the vocabulary sizes must match (models with padded vocabularies of different sizes would need an
explicit slice, which we refuse to guess: the published ``[:151851]`` is not reproduced).
"""
from __future__ import annotations

import torch

from mckd.criteria.base import Criterion, CriterionOutput, ModelDims, ModelView, register_criterion
from mckd.criteria.common import (combine_losses, count_tokens, gather_rows, label_mask, label_rows,
                                  upcast)
from mckd.criteria.cross_entropy import sft_terms
from mckd.criteria.divergences import get_divergence
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions


def check_same_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor, name: str) -> None:
    """Clear error when a same-tokenizer criterion gets mismatched logits."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; this criterion needs teacher and student to share "
            f"one tokenizer and vocabulary size (use a cross-tokenizer criterion such as "
            f"dual_space_kd_with_cma, universal_logit_distillation, min_edit_dis_kld or mcw_kd)")


@register_criterion("various_divergence")
class VariousDivergence(Criterion):
    """Vanilla KD with a selectable divergence."""

    published_combination = "interpolate"

    needs_teacher = True

    def __init__(self, kd_objective: str = KD_DEFAULTS.kd_objective, kd_rate: float = KD_DEFAULTS.kd_rate,
                 kd_temperature: float = KD_DEFAULTS.kd_temperature,
                 tau_squared: bool = KD_DEFAULTS.kd_temperature_scaling,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing,
                 loss_combination: str = KD_DEFAULTS.loss_combination,
                 adaptive_kl_alpha: float = KD_DEFAULTS.adaptive_kl_alpha,
                 skew_lambda: float = KD_DEFAULTS.skew_lambda):
        super().__init__()
        self.divergence = get_divergence(kd_objective, adaptive_kl_alpha=adaptive_kl_alpha,
                                         skew_lambda=skew_lambda)
        self.kd_objective = kd_objective
        self.kd_rate = kd_rate
        self.kd_temperature = kd_temperature
        self.tau_squared = tau_squared
        self.label_smoothing = label_smoothing
        self.loss_combination = loss_combination

    option_groups = (KDOptions,)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims, resources=None) -> "VariousDivergence":
        kd = options[KDOptions]
        return cls(kd_objective=kd.kd_objective, kd_rate=kd.kd_rate, kd_temperature=kd.kd_temperature,
                   tau_squared=kd.kd_temperature_scaling, label_smoothing=kd.label_smoothing,
                   loss_combination=kd.loss_combination, adaptive_kl_alpha=kd.adaptive_kl_alpha,
                   skew_lambda=kd.skew_lambda)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        if teacher is None:
            raise ValueError("various_divergence: needs a teacher, but the loop passed teacher=None")
        labels = batch["labels"]
        check_same_vocab(student.logits, teacher.logits, "various_divergence")
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        rows = label_rows(label_mask(labels))                               # label rows only
        per_token = self.divergence(gather_rows(student.logits, rows),
                                    gather_rows(teacher.logits.detach(), rows),
                                    temperature=self.kd_temperature, tau_squared=self.tau_squared)
        kd = upcast(per_token).sum()                                        # (n,) -> ()
        loss = combine_losses(ce, kd, self.kd_rate, self.loss_combination, published="interpolate")
        metrics.update(kd_loss=kd.detach(), loss=loss.detach())
        return CriterionOutput(loss, count_tokens(labels), metrics)
