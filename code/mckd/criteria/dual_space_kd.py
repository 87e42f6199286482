"""``dual_space_kd``: DSKD between models sharing one tokenizer.

Positions coincide, so the teacher's hidden states are projected straight into the student space
and the student's into the teacher space:

    z_t2s = P_t2s(h_t) W_s^T                       (student head detached)
    z_s2t = P_s2t(h_s) W_t^T                       (teacher head detached)
    KD    = CE(z_t2s, y_s) + sum_s D_tau(z_s || sg(z_t2s)) + sum_t FKL_tau(z_t || z_s2t)
    loss  = (1 - l) CE + l KD                      (``--loss-combination``)

``D`` is ``--kd-objective``; the teacher-space term is always forward KL, as published. The
published student-space term has no accuracy mask (unlike the CMA variant) and no extra teacher
temperature; both are kept. ``tau_squared`` optionally scales both KD terms by tau^2.
"""
from __future__ import annotations

import torch

from mckd.criteria.base import Criterion, CriterionOutput, ModelDims, ModelView, register_criterion
from mckd.criteria.common import (combine_losses, count_tokens, cross_entropy_rows, gather_rows,
                                  head_logits, label_mask, label_rows, require_hidden, teacher_labels,
                                  upcast)
from mckd.criteria.cross_entropy import sft_terms
from mckd.criteria.divergences import Divergence, forward_kl, get_divergence
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions
from mckd.models.projectors import build_projectors, load_projector_weights, run_projector

DSKD_PROJECTORS = ("t2s", "s2t")


def dskd_losses(*, student_logits: torch.Tensor, student_hidden: torch.Tensor,
                teacher_logits: torch.Tensor, teacher_hidden: torch.Tensor,
                labels: torch.Tensor, teacher_labels: torch.Tensor,
                student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor,
                t2s_proj: torch.nn.Module, s2t_proj: torch.nn.Module,
                kd_divergence: Divergence = forward_kl, temperature: float = 1.0,
                tau_squared: bool = False) -> dict[str, torch.Tensor]:
    """The three DSKD terms as token sums.

    Args:
        student_logits: (B, T, V_s); student_hidden: (B, T, D_s).
        teacher_logits: (B, T, V_t); teacher_hidden: (B, T, D_t) (same positions as the student).
        labels, teacher_labels: (B, T) shifted labels (-100 = ignored).
        student_head_weight: (V_s, D_s); teacher_head_weight: (V_t, D_t); used detached.
        t2s_proj: D_t -> D_s; s2t_proj: D_s -> D_t.
        kd_divergence: student-space divergence. temperature: tau. tau_squared: scale by tau^2.

    Returns:
        dict with ``kd`` (differentiable total) and detached ``t2s_ce_loss``, ``t2s_kd_loss``,
        ``s2t_kd_loss``, ``t2s_acc``, ``s2t_acc`` (token sums / counts).
    """
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"dual_space_kd: student and teacher sequences must have the same positions "
                         f"(same tokenizer), got hidden {tuple(student_hidden.shape)} and "
                         f"{tuple(teacher_hidden.shape)}; use dual_space_kd_with_cma across tokenizers")
    m_s, m_t = label_mask(labels), label_mask(teacher_labels)
    # vocabulary-sized work on the label rows only (nothing else is used)
    rows_s, rows_t = label_rows(m_s), label_rows(m_t)                          # (n_s,), (n_t,)
    y_s, y_t = gather_rows(labels, rows_s), gather_rows(teacher_labels, rows_t)
    # student space: project the teacher's hidden states, read them with the student head
    h_t2s = run_projector(t2s_proj, gather_rows(teacher_hidden.detach(), rows_s))  # (n_s, D_s)
    z_t2s = head_logits(h_t2s, student_head_weight)                            # (n_s, V_s)
    t2s_ce, _ = cross_entropy_rows(z_t2s, y_s)
    t2s_kd = upcast(kd_divergence(gather_rows(student_logits, rows_s), z_t2s.detach(),
                                  temperature=temperature, tau_squared=tau_squared)).sum()
    # teacher space: project the student's hidden states, read them with the teacher head
    h_s2t = run_projector(s2t_proj, gather_rows(student_hidden, rows_t))       # (n_t, D_t)
    z_s2t = head_logits(h_s2t, teacher_head_weight)                            # (n_t, V_t)
    s2t_kd = upcast(forward_kl(z_s2t, gather_rows(teacher_logits.detach(), rows_t),
                               temperature=temperature, tau_squared=tau_squared)).sum()
    with torch.no_grad():
        t2s_acc = z_t2s.argmax(-1).eq(y_s).sum()
        s2t_acc = z_s2t.argmax(-1).eq(y_t).sum() * m_s.sum() / m_t.sum().clamp_min(1)
    return {"kd": t2s_ce + t2s_kd + s2t_kd, "t2s_ce_loss": t2s_ce.detach(),
            "t2s_kd_loss": t2s_kd.detach(), "s2t_kd_loss": s2t_kd.detach(),
            "t2s_acc": t2s_acc, "s2t_acc": s2t_acc}


@register_criterion("dual_space_kd")
class DualSpaceKD(Criterion):
    """DSKD (same vocabulary); trainable projectors ``t2s`` and ``s2t``."""

    published_combination = "interpolate"

    needs_teacher = True
    needs_hidden = True
    teacher_modules = ("lm_head",)

    def __init__(self, student_hidden: int, teacher_hidden: int, *, kd_rate: float = KD_DEFAULTS.kd_rate,
                 kd_objective: str = KD_DEFAULTS.kd_objective,
                 kd_temperature: float = KD_DEFAULTS.kd_temperature,
                 tau_squared: bool = KD_DEFAULTS.kd_temperature_scaling,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing,
                 loss_combination: str = KD_DEFAULTS.loss_combination,
                 adaptive_kl_alpha: float = KD_DEFAULTS.adaptive_kl_alpha,
                 skew_lambda: float = KD_DEFAULTS.skew_lambda,
                 projector_config_path: str | None = KD_DEFAULTS.projector_config_path,
                 projector_path: str | None = KD_DEFAULTS.projector_path):
        super().__init__()
        self.projectors = build_projectors(DSKD_PROJECTORS, student_hidden, teacher_hidden,
                                           config_path=projector_config_path)
        if projector_path:
            load_projector_weights(self.projectors, projector_path)
        self.divergence = get_divergence(kd_objective, adaptive_kl_alpha=adaptive_kl_alpha,
                                         skew_lambda=skew_lambda)
        self.kd_rate, self.kd_temperature, self.tau_squared = kd_rate, kd_temperature, tau_squared
        self.label_smoothing, self.loss_combination = label_smoothing, loss_combination

    option_groups = (KDOptions,)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims, resources=None) -> "DualSpaceKD":
        kd = options[KDOptions]
        return cls(dims.student_hidden, dims.teacher_hidden, kd_rate=kd.kd_rate,
                   kd_objective=kd.kd_objective, kd_temperature=kd.kd_temperature,
                   tau_squared=kd.kd_temperature_scaling, label_smoothing=kd.label_smoothing,
                   loss_combination=kd.loss_combination, adaptive_kl_alpha=kd.adaptive_kl_alpha,
                   skew_lambda=kd.skew_lambda, projector_config_path=kd.projector_config_path,
                   projector_path=kd.projector_path)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        h_s = require_hidden(student, "student", "dual_space_kd")
        h_t = require_hidden(teacher, "teacher", "dual_space_kd")
        labels = batch["labels"]
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        terms = dskd_losses(
            student_logits=student.logits, student_hidden=h_s, teacher_logits=teacher.logits,
            teacher_hidden=h_t, labels=labels, teacher_labels=teacher_labels(batch),
            student_head_weight=student.lm_head_weight, teacher_head_weight=teacher.lm_head_weight,
            t2s_proj=self.projectors["t2s"], s2t_proj=self.projectors["s2t"],
            kd_divergence=self.divergence, temperature=self.kd_temperature,
            tau_squared=self.tau_squared)
        kd = terms.pop("kd")
        loss = combine_losses(ce, kd, self.kd_rate, self.loss_combination, "interpolate")
        metrics.update(terms, kd_loss=kd.detach(), loss=loss.detach())
        return CriterionOutput(loss, count_tokens(labels), metrics)
