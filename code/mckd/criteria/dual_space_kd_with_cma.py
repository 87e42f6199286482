"""``dual_space_kd_with_cma``: DSKD with cross-model attention, any pair of tokenizers.

Cross-model attention (CMA) aligns the student's response tokens with the teacher's: student
queries ``[E_s(x); E_s(y)]`` attend over teacher keys ``[E_t(x); E_t(y)]``. With it:

    t2s: H = softmax(A) V_t, z_t2s = H W_s^T       (V_t = P_t2s(h_t/std + E_t(y)/std))
    s2t: H' = softmax(A^T) V_s, z_s2t = H' W_t^T   (V_s = P_s2t(h_s))
    KD  = CE(z_t2s, y_s) + sum_s acc * D_{tau, tau_t}(z_s || sg(z_t2s)) + sum_t FKL_tau(z_t || z_s2t)
    loss = (1 - l) CE + l KD   (``--loss-combination``)

with ``A = Q K^T / sqrt(2 D_t)``, ``Q = P_query([E_s(x); E_s(y)])``, ``K = [E_t(x); E_t(y)]/std``,
only student label positions attending to teacher label positions; embeddings and heads detached.

:func:`cma_losses` is the pure function (MCW-KD reuses it). Differences from the published code:

* ``normalization``: the published scaling divides by ONE std over the whole batch tensor,
  padding included, so padding and batch composition change the loss. Choices:
  ``"published"`` (exactly that), ``"masked_std"`` (default: the same global std, over label
  positions only, so padding has no effect) and ``"token_rms"`` (each token divided by its own
  RMS; batch-independent).
* ``t2s_accuracy_mask`` (default True = published): the t2s KD term only counts positions where
  the projected teacher already predicts the gold token; False uses all positions.
* masked attention logits are set to -1e5 (published: -1e5 added); identical for every row that
  has a valid key, and those without one are masked out of every loss.
* ``tau_squared`` optionally scales both KD terms by tau^2.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mckd.criteria.base import (Criterion, CriterionOutput, CriterionResources, ModelDims, ModelView,
                               register_criterion)
from mckd.criteria.common import (combine_losses, count_tokens, cross_entropy_rows, gather_rows,
                                  head_logits, label_mask, label_rows, masked_sum, require_hidden,
                                  safe_targets, teacher_input_ids, teacher_labels, upcast)
from mckd.criteria.cross_entropy import sft_terms
from mckd.criteria.divergences import Divergence, forward_kl, get_divergence
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions, OptionGroup
from mckd.models.projectors import build_projectors, load_projector_weights, run_projector
from mckd.options import opt

CMA_NORMALIZATIONS = ("published", "masked_std", "token_rms")


@dataclass(frozen=True)
class CMAOptions(OptionGroup):
    """dual_space_kd_with_cma (also used by the CMA terms of mcw_kd and dwa_kd)"""

    cma_normalization: str = opt("masked_std", "scale normalisation of CMA keys/values: published = "
                                 "one std over the whole batch incl. padding; masked_std = the same "
                                 "over label positions; token_rms = per-token RMS",
                                 choices=CMA_NORMALIZATIONS)
    cma_t2s_accuracy_mask: bool = opt(True, "t2s KD only where the projected teacher predicts the "
                                      "gold token (published: on; --no-cma-t2s-accuracy-mask to use "
                                      "all label positions)", action=argparse.BooleanOptionalAction)


CMA_DEFAULTS = CMAOptions()  # its defaults as values, for the constructors of the CMA criteria


CMA_PROJECTORS = ("query", "t2s", "s2t")
_MASKED_SCORE = -1e5


@dataclass
class CMATerms:
    """Token sums of the CMA terms (0-dim tensors). ``kd`` is the KD total; ``metrics`` holds
    detached token sums: t2s_ce_loss, t2s_kd_loss, s2t_kd_loss, t2s_acc, s2t_acc, max_t2s_prob."""

    kd: torch.Tensor
    t2s_ce: torch.Tensor
    t2s_kd: torch.Tensor
    s2t_kd: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def normalize_scale(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Divide by a scale statistic (no centring), as CMA does with keys, values and embeddings.

    Args:
        x: (B, T, D).
        mask: (B, T) bool, positions that count for ``"masked_std"``.
        how: one of :data:`CMA_NORMALIZATIONS`.

    Returns:
        (B, T, D) same dtype.
    """
    if how == "published":
        return x / x.std()
    if how == "masked_std":
        xf = upcast(x)
        m = mask.unsqueeze(-1).to(xf.dtype)                                     # (B, T, 1)
        n = m.sum() * x.shape[-1]
        mean = (xf * m).sum() / n.clamp_min(1)
        var = (((xf - mean) * m) ** 2).sum() / (n - 1).clamp_min(1)
        std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
        return (xf / std).to(x.dtype)
    if how == "token_rms":
        xf = upcast(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    raise ValueError(f"--cma-normalization: unknown value {how!r}; choose one of "
                     f"{', '.join(CMA_NORMALIZATIONS)}")


def cma_losses(*, student_logits: torch.Tensor, student_hidden: torch.Tensor,
               teacher_logits: torch.Tensor, teacher_hidden: torch.Tensor,
               input_ids: torch.Tensor, labels: torch.Tensor,
               teacher_input_ids: torch.Tensor, teacher_labels: torch.Tensor,
               student_embed: nn.Module, teacher_embed: nn.Module,
               student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor,
               query_proj: nn.Module, t2s_proj: nn.Module, s2t_proj: nn.Module,
               kd_divergence: Divergence = forward_kl, temperature: float = 1.0,
               teacher_temperature: float = 1.0, tau_squared: bool = False,
               normalization: str = "masked_std", t2s_accuracy_mask: bool = True,
               projector_pretraining: bool = False, t2s_weights: torch.Tensor | None = None,
               s2t_weights: torch.Tensor | None = None) -> CMATerms:
    """The DSKD-CMA knowledge-distillation terms, batched.

    Args:
        student_logits: (B, T_s, V_s). student_hidden: (B, T_s, D_s) last layer.
        teacher_logits: (B, T_t, V_t). teacher_hidden: (B, T_t, D_t) last layer.
        input_ids, labels: (B, T_s) student ids and shifted labels (-100 = ignored).
        teacher_input_ids, teacher_labels: (B, T_t).
        student_embed, teacher_embed: input-embedding modules (ids -> (.., D)); used without grad.
        student_head_weight: (V_s, D_s); teacher_head_weight: (V_t, D_t); used detached.
        query_proj: (.., 2 D_s) -> (.., 2 D_t). t2s_proj: D_t -> D_s. s2t_proj: D_s -> D_t.
        kd_divergence: divergence of the t2s KD term (``--kd-objective``).
        temperature: tau. teacher_temperature: tau_t (t2s term only).
        tau_squared: scale both KD terms by tau^2.
        normalization: see the module docstring.
        t2s_accuracy_mask: only positions where argmax z_t2s == y_s count in the t2s KD term.
        projector_pretraining: KD = t2s CE only (published ``--only-save-projector`` mode).
        t2s_weights: optional (B, T_s) per-position weights of the t2s KD term (DWA-KD).
        s2t_weights: optional (B, T_t) per-position weights of the s2t KD term (DWA-KD).

    Returns:
        :class:`CMATerms`.
    """
    if normalization not in CMA_NORMALIZATIONS:
        raise ValueError(f"--cma-normalization: unknown value {normalization!r}; choose one of "
                         f"{', '.join(CMA_NORMALIZATIONS)}")
    m_s, m_t = label_mask(labels), label_mask(teacher_labels)                  # (B, T_s), (B, T_t)
    d_t = teacher_hidden.shape[-1]
    with torch.no_grad():
        # step 1: detached embeddings of inputs and targets, id 0 off the label positions
        e_s_in = student_embed(input_ids * m_s)
        e_s_tg = student_embed(safe_targets(labels))
        e_t_in = teacher_embed(teacher_input_ids * m_t)
        e_t_tg = teacher_embed(safe_targets(teacher_labels))
        q_in = torch.cat([e_s_in, e_s_tg], dim=-1)                             # (B, T_s, 2 D_s)
        k_in = torch.cat([e_t_in, e_t_tg], dim=-1)                             # (B, T_t, 2 D_t)
        # step 2: scale normalisation
        keys = upcast(normalize_scale(k_in, m_t, normalization))
        e_t_tg = normalize_scale(e_t_tg, m_t, normalization)
        h_t = normalize_scale(teacher_hidden.detach(), m_t, normalization)
    # step 3: projections (fp32 attention)
    query = upcast(run_projector(query_proj, q_in))                            # (B, T_s, 2 D_t)
    v_t = upcast(run_projector(t2s_proj, h_t + e_t_tg))                        # (B, T_t, D_s)
    v_s = upcast(run_projector(s2t_proj, student_hidden))                      # (B, T_s, D_t)
    # step 4: attention scores, label positions to label positions only
    scores = query @ keys.transpose(1, 2) / math.sqrt(2 * d_t)                 # (B, T_s, T_t)
    pair = m_s.unsqueeze(2) & m_t.unsqueeze(1)
    scores = scores.masked_fill(~pair, _MASKED_SCORE)
    # step 5: teacher -> student, on the student's label rows only (nothing else is used)
    rows_s, rows_t = label_rows(m_s), label_rows(m_t)                          # (n_s,), (n_t,)
    y_s, y_t = gather_rows(labels, rows_s), gather_rows(teacher_labels, rows_t)
    h_t2s = gather_rows(torch.softmax(scores, dim=-1) @ v_t, rows_s)           # (n_s, D_s)
    z_t2s = head_logits(h_t2s.to(student_hidden.dtype), student_head_weight)   # (n_s, V_s)
    t2s_ce, _ = cross_entropy_rows(z_t2s, y_s)
    with torch.no_grad():
        correct = z_t2s.argmax(-1).eq(y_s)                                     # (n_s,)
        zf = upcast(z_t2s)
        max_prob = (zf.amax(-1) - torch.logsumexp(zf, -1)).exp()               # max softmax
        del zf
    metrics = {"t2s_ce_loss": t2s_ce.detach(), "t2s_acc": correct.sum(),
               "max_t2s_prob": max_prob.sum()}
    if projector_pretraining:
        zero = t2s_ce.new_zeros(())
        return CMATerms(t2s_ce, t2s_ce, zero, zero, metrics)
    # step 6: KD in the student space (on the gold-predicting positions) and the teacher space
    t2s_kd_tok = kd_divergence(gather_rows(student_logits, rows_s), z_t2s.detach(),
                               temperature=temperature, teacher_temperature=teacher_temperature,
                               tau_squared=tau_squared)                        # (n_s,)
    if t2s_weights is not None:
        t2s_kd_tok = upcast(t2s_kd_tok) * gather_rows(t2s_weights, rows_s).to(upcast(t2s_kd_tok).dtype)
    t2s_kd = masked_sum(t2s_kd_tok, correct) if t2s_accuracy_mask else upcast(t2s_kd_tok).sum()
    h_s2t = gather_rows(torch.softmax(scores.transpose(1, 2), dim=-1) @ v_s, rows_t)  # (n_t, D_t)
    z_s2t = head_logits(h_s2t.to(teacher_hidden.dtype), teacher_head_weight)   # (n_t, V_t)
    s2t_tok = upcast(forward_kl(z_s2t, gather_rows(teacher_logits.detach(), rows_t),
                                temperature=temperature, tau_squared=tau_squared))  # (n_t,)
    if s2t_weights is not None:
        s2t_tok = s2t_tok * gather_rows(s2t_weights, rows_t).to(s2t_tok.dtype)
    s2t_kd = s2t_tok.sum()
    with torch.no_grad():
        s2t_correct = z_s2t.argmax(-1).eq(y_t).sum()
        # published: teacher-side count rescaled to the student's token count
        s2t_acc = s2t_correct * m_s.sum() / m_t.sum().clamp_min(1)
    metrics.update(t2s_kd_loss=t2s_kd.detach(), s2t_kd_loss=s2t_kd.detach(), s2t_acc=s2t_acc)
    return CMATerms(t2s_ce + t2s_kd + s2t_kd, t2s_ce, t2s_kd, s2t_kd, metrics)


@register_criterion("dual_space_kd_with_cma")
class DualSpaceKDWithCMA(Criterion):
    """DSKD with cross-model attention; trainable projectors ``query``, ``t2s``, ``s2t``."""

    published_combination = "interpolate"

    needs_teacher = True
    needs_hidden = True
    teacher_modules = ("embed_tokens", "lm_head")
    cross_tokenizer = True

    def __init__(self, student_hidden: int, teacher_hidden: int, *, kd_rate: float = KD_DEFAULTS.kd_rate,
                 kd_objective: str = KD_DEFAULTS.kd_objective,
                 kd_temperature: float = KD_DEFAULTS.kd_temperature,
                 teacher_temperature: float = KD_DEFAULTS.teacher_temperature,
                 tau_squared: bool = KD_DEFAULTS.kd_temperature_scaling,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing,
                 loss_combination: str = KD_DEFAULTS.loss_combination,
                 adaptive_kl_alpha: float = KD_DEFAULTS.adaptive_kl_alpha,
                 skew_lambda: float = KD_DEFAULTS.skew_lambda, normalization: str = CMA_DEFAULTS.cma_normalization,
                 t2s_accuracy_mask: bool = CMA_DEFAULTS.cma_t2s_accuracy_mask, projector_pretraining: bool = False,
                 projector_config_path: str | None = KD_DEFAULTS.projector_config_path,
                 projector_path: str | None = KD_DEFAULTS.projector_path):
        super().__init__()
        if normalization not in CMA_NORMALIZATIONS:
            raise ValueError(f"--cma-normalization: unknown value {normalization!r}; choose one of "
                             f"{', '.join(CMA_NORMALIZATIONS)}")
        self.projectors = build_projectors(CMA_PROJECTORS, student_hidden, teacher_hidden,
                                           config_path=projector_config_path)
        if projector_path:
            load_projector_weights(self.projectors, projector_path)
        self.divergence = get_divergence(kd_objective, adaptive_kl_alpha=adaptive_kl_alpha,
                                         skew_lambda=skew_lambda)
        self.kd_rate, self.kd_temperature = kd_rate, kd_temperature
        self.teacher_temperature, self.tau_squared = teacher_temperature, tau_squared
        self.label_smoothing, self.loss_combination = label_smoothing, loss_combination
        self.normalization, self.t2s_accuracy_mask = normalization, t2s_accuracy_mask
        self.projector_pretraining = projector_pretraining

    option_groups = (KDOptions, CMAOptions)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims,
                     resources: CriterionResources | None = None) -> "DualSpaceKDWithCMA":
        return cls(dims.student_hidden, dims.teacher_hidden, **cma_kwargs(options, resources))

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        name = "dual_space_kd_with_cma"
        h_s = require_hidden(student, "student", name)
        h_t = require_hidden(teacher, "teacher", name)
        labels = batch["labels"]
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        terms = cma_losses(
            student_logits=student.logits, student_hidden=h_s, teacher_logits=teacher.logits,
            teacher_hidden=h_t, input_ids=batch["input_ids"], labels=labels,
            teacher_input_ids=teacher_input_ids(batch), teacher_labels=teacher_labels(batch),
            student_embed=student.embed_tokens, teacher_embed=teacher.embed_tokens,
            student_head_weight=student.lm_head_weight, teacher_head_weight=teacher.lm_head_weight,
            query_proj=self.projectors["query"], t2s_proj=self.projectors["t2s"],
            s2t_proj=self.projectors["s2t"], kd_divergence=self.divergence,
            temperature=self.kd_temperature, teacher_temperature=self.teacher_temperature,
            tau_squared=self.tau_squared, normalization=self.normalization,
            t2s_accuracy_mask=self.t2s_accuracy_mask,
            projector_pretraining=self.projector_pretraining)
        loss = combine_losses(ce, terms.kd, self.kd_rate, self.loss_combination, "interpolate")
        metrics.update(terms.metrics, kd_loss=terms.kd.detach(), loss=loss.detach())
        return CriterionOutput(loss, count_tokens(labels), metrics)


def cma_kwargs(options: CriterionOptions, resources: CriterionResources | None = None) -> dict:
    """Keyword arguments of :class:`DualSpaceKDWithCMA` (minus the sizes) from the run's options."""
    kd, cma = options[KDOptions], options[CMAOptions]
    return dict(kd_rate=kd.kd_rate, kd_objective=kd.kd_objective, kd_temperature=kd.kd_temperature,
                teacher_temperature=kd.teacher_temperature, tau_squared=kd.kd_temperature_scaling,
                label_smoothing=kd.label_smoothing, loss_combination=kd.loss_combination,
                adaptive_kl_alpha=kd.adaptive_kl_alpha, skew_lambda=kd.skew_lambda,
                normalization=cma.cma_normalization, t2s_accuracy_mask=cma.cma_t2s_accuracy_mask,
                projector_pretraining=resources is not None and resources.projector_pretraining,
                projector_config_path=kd.projector_config_path, projector_path=kd.projector_path)
