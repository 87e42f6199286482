"""``dwa_kd``: DWA-KD, dual-space entropy weighting and Soft-DTW alignment, any pair of tokenizers.

DWA-KD (Vu et al., "Dual-Space Weighting and Time-Warped Alignment for Cross-Tokenizer Knowledge
Distillation", arXiv 2602.21669, Findings of EACL 2026) adds two things to dual-space KD:

1. *Dual-space weighting.* The student-space KD term of each student label position is weighted by
   the student's uncertainty, the teacher-space term of each teacher label position by the
   teacher's confidence, each normalised to mean 1 over the example's label positions::

       w_s[i] = H(p_s[i]) / mean_i' H(p_s[i'])                       (detached)
       c_t[j] = clamp(1 - H(q_t[j]) / log V_t, 0, 1),  w_t[j] = c_t[j] / mean_j' c_t[j']

2. *Time-warped alignment.* Soft-DTW divergences between the student's response sequence and the
   teacher's, projected into the student space, on two levels::

       DTW = D_gamma(E_s(y_s), P_e(E_t(y_t))) + D_gamma(h_s, P_h(h_t))
       D_gamma(x, y) = SDTW(C_xy) - (SDTW(C_xx) + SDTW(C_yy)) / 2,   C_ab = 1 - cos(a_i, b_j)

   over the label positions of each side (embeddings of the label tokens, last hidden states),
   with the batched anti-diagonal Soft-DTW of :mod:`mckd.ot.soft_dtw`.

    loss = CE + kd_rate * KD_weighted + dtw_rate * sum_b DTW_b

The weighted dual-space KD runs on one of two token alignments (``--dwa-token-alignment``):
``cma`` (default), DSKD-CMA's cross-model attention with the weights on its t2s and s2t terms
(:func:`mckd.criteria.dual_space_kd_with_cma.cma_losses`); ``exact``, DSKDv2's exactly aligned
pairs (:func:`mckd.criteria.dual_space_kd_v2.eta_dual_space_terms`, its ``--dskdv2-*`` options).

Sources and choices. The paper's text was reachable only through its abstract; the formulas above
follow the abstract and a public implementation of the method (class ``DWAKD`` built on the DSKD
code base, read through the code index), whose entropy weights, normalisation to mean 1, cosine
Soft-DTW divergence on label-token embeddings and last hidden states, and DSKD-CMA base are kept.
Left out as undocumented heuristics of that implementation: a gate of the t2s term by the projected
teacher's confidence, warm-ups of the KD and DTW weights, a schedule of gamma and a band penalty
around the attention diagonal. Chosen here: Soft-DTW over the *response* positions of each side
(the implementation sliced the first ``n`` positions of the sequence, i.e. prompt tokens);
separate ``dtw_embed``/``dtw_hidden`` projectors (``t-s`` by default); ``gamma`` 1.0 and
``dtw_rate`` 1.0 as defaults (the implementation annealed gamma from 2.0 to 0.8). The DTW term is
a per-sequence value added to the token-summed loss, as in that implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mckd.criteria.base import Criterion, CriterionOutput, ModelDims, ModelView, register_criterion
from mckd.criteria.common import (count_tokens, label_mask, require_hidden, safe_targets, teacher_input_ids,
                                  teacher_labels, upcast)
from mckd.criteria.cross_entropy import sft_terms
from mckd.criteria.divergences import get_divergence
from mckd.criteria.dual_space_kd_v2 import (DSKDv2Options, ExactAlignmentProjectors, eta_dual_space_terms,
                                            eta_metrics, heads_and_overlap, normalize_terms, shared_map_tensor)
from mckd.criteria.dual_space_kd_with_cma import CMA_PROJECTORS, CMAOptions, cma_kwargs, cma_losses
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions, OptionGroup
from mckd.models.projectors import build_projectors, load_projector_weights, run_projector
from mckd.ot.costs import pairwise_cosine_distance
from mckd.ot.soft_dtw import soft_dtw_divergence
from mckd.options import opt

TOKEN_ALIGNMENTS = ("cma", "exact")


@dataclass(frozen=True)
class DWAOptions(OptionGroup):
    """dwa_kd"""

    dwa_token_alignment: str = opt("cma", "token alignment of the weighted dual-space KD: cma "
                                   "(cross-model attention) or exact (DSKDv2's exactly aligned pairs; "
                                   "--dskdv2-* options)", choices=TOKEN_ALIGNMENTS)
    dwa_dtw_rate: float = opt(1.0, "weight of the two Soft-DTW divergences (embeddings, last hidden "
                                   "states)")
    dwa_gamma: float = opt(1.0, "Soft-DTW smoothing gamma")


_DWA = DWAOptions()  # its defaults as values, for the constructors below


DTW_PROJECTORS = ("dtw_embed", "dtw_hidden")


def entropy_rows(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` at the masked positions, 0 elsewhere, without gradient.

    Args:
        logits: (B, T, V); mask: (B, T) bool.

    Returns:
        (B, T) fp32.
    """
    with torch.no_grad():
        b, t = mask.nonzero(as_tuple=True)
        lp = torch.log_softmax(upcast(logits[b, t]), dim=-1)                          # (n, V)
        h = -(lp.exp() * lp).sum(-1)
        out = torch.zeros(mask.shape, dtype=h.dtype, device=logits.device)
        out[b, t] = h
    return out


def mean_one(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rescale each row of ``w`` to mean 1 over its masked positions (0 elsewhere).

    Args:
        w: (B, T) non-negative; mask: (B, T) bool.
    """
    w = torch.where(mask, w, torch.zeros_like(w))
    n = mask.sum(1, keepdim=True).to(w.dtype)
    return w * n / w.sum(1, keepdim=True).clamp_min(1e-9)


def dual_space_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       teacher_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DWA-KD's weights: student uncertainty (B, T_s) and teacher confidence (B, T_t), mean 1 per row."""
    m_s, m_t = label_mask(labels), label_mask(teacher_labels)
    w_s = mean_one(entropy_rows(student_logits, m_s), m_s)
    h_t = entropy_rows(teacher_logits, m_t)
    conf = (1.0 - h_t / math.log(max(teacher_logits.shape[-1], 2))).clamp(0.0, 1.0)
    return w_s, mean_one(conf, m_t)


def response_sequences(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label positions of each row moved to the front (they are contiguous: the response).

    Args:
        x: (B, T, D); labels: (B, T).

    Returns:
        ``(seq, lengths)``: (B, L, D) with ``L`` the longest response (rows padded with their last
        label position, never read by Soft-DTW) and (B,) long lengths.
    """
    m = label_mask(labels)
    n = m.sum(1)                                                                      # (B,)
    start = m.int().argmax(1)                                                         # first label
    L = max(int(n.max()), 1)
    idx = (start[:, None] + torch.arange(L, device=x.device)[None, :]).clamp_max(x.shape[1] - 1)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])), n


def dtw_terms(*, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
              teacher_labels: torch.Tensor, student_embed: nn.Module, teacher_embed: nn.Module,
              embed_proj: nn.Module, hidden_proj: nn.Module, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two Soft-DTW divergences per example.

    Args:
        student_hidden: (B, T_s, D_s); teacher_hidden: (B, T_t, D_t) last layers.
        labels: (B, T_s); teacher_labels: (B, T_t).
        student_embed / teacher_embed: input-embedding modules (the student's with gradient).
        embed_proj / hidden_proj: D_t -> D_s projectors.
        gamma: Soft-DTW smoothing.

    Returns:
        ``(embed, hidden)``: (B,) each.
    """
    e_s = student_embed(safe_targets(labels))                                         # (B, T_s, D_s)
    with torch.no_grad():
        e_t = teacher_embed(safe_targets(teacher_labels))                             # (B, T_t, D_t)
    xs, n_s = response_sequences(e_s, labels)
    xt, n_t = response_sequences(e_t, teacher_labels)
    embed = soft_dtw_divergence(upcast(xs), upcast(run_projector(embed_proj, xt)), n_s, n_t, gamma,
                                pairwise_cosine_distance)
    hs, _ = response_sequences(student_hidden, labels)
    ht, _ = response_sequences(teacher_hidden.detach(), teacher_labels)
    hidden = soft_dtw_divergence(upcast(hs), upcast(run_projector(hidden_proj, ht)), n_s, n_t, gamma,
                                 pairwise_cosine_distance)
    return embed, hidden


@register_criterion("dwa_kd")
class DWAKD(Criterion):
    """DWA-KD. See the module docstring."""

    needs_teacher = True
    needs_hidden = True
    cross_tokenizer = True
    alignment = ()  # ("exact",) with --dwa-token-alignment exact (set per instance)

    def __init__(self, student_hidden: int, teacher_hidden: int, *,
                 token_alignment: str = _DWA.dwa_token_alignment, dtw_rate: float = _DWA.dwa_dtw_rate,
                 gamma: float = _DWA.dwa_gamma, kd_rate: float = KD_DEFAULTS.kd_rate,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing, cma_options: dict | None = None,
                 projector_config_path: str | None = KD_DEFAULTS.projector_config_path,
                 projector_path: str | None = KD_DEFAULTS.projector_path, eta: dict | None = None):
        """Args:
            token_alignment: "cma" or "exact". dtw_rate: weight of the Soft-DTW terms (0: off).
            gamma: Soft-DTW smoothing. kd_rate: weight of the weighted dual-space KD.
            cma_options: keyword options of :func:`cma_losses` (divergence, temperatures, ...).
            eta: for "exact": ``tea2stu`` plus the ``ExactAlignmentProjectors`` arguments and the
                ``--dskdv2-*`` values (``agreement``, ``normalization``).
        """
        super().__init__()
        if token_alignment not in TOKEN_ALIGNMENTS:
            raise ValueError(f"--dwa-token-alignment: unknown value {token_alignment!r}; choose one of "
                             f"{TOKEN_ALIGNMENTS}")
        if gamma <= 0 or dtw_rate < 0:
            raise ValueError(f"--dwa-gamma must be > 0 and --dwa-dtw-rate >= 0, got {gamma}, {dtw_rate}")
        self.token_alignment, self.dtw_rate, self.gamma = token_alignment, float(dtw_rate), float(gamma)
        self.kd_rate, self.label_smoothing = float(kd_rate), float(label_smoothing)
        self.cma_options = dict(cma_options or {})
        names = DTW_PROJECTORS if self.dtw_rate > 0 else ()
        if token_alignment == "cma":
            names = CMA_PROJECTORS + names
        self.projectors = build_projectors(names, student_hidden, teacher_hidden, config_path=projector_config_path)
        if token_alignment == "exact":
            eta = dict(eta or {})
            self.register_buffer("tea2stu", torch.as_tensor(eta.pop("tea2stu"), dtype=torch.long), persistent=False)
            self.eta_agreement = eta.pop("agreement", 1.0)
            self.eta_normalization = eta.pop("normalization", "aligned")
            self.eta_projectors = ExactAlignmentProjectors(student_hidden, teacher_hidden, **eta)
            self.alignment = ("exact",)
        if projector_path:
            load_projector_weights(self.projectors, projector_path)

    option_groups = (KDOptions, CMAOptions, DSKDv2Options, DWAOptions)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims, resources=None) -> "DWAKD":
        if dims.teacher_hidden is None:
            raise ValueError("dwa_kd: needs a teacher (--teacher-model-path)")
        kw = cma_kwargs(options, resources)
        dwa, v2 = options[DWAOptions], options[DSKDv2Options]
        cma_options = dict(kd_divergence=get_divergence(kw["kd_objective"], adaptive_kl_alpha=kw["adaptive_kl_alpha"],
                                                        skew_lambda=kw["skew_lambda"]),
                           temperature=kw["kd_temperature"], teacher_temperature=kw["teacher_temperature"],
                           tau_squared=kw["tau_squared"], normalization=kw["normalization"],
                           t2s_accuracy_mask=kw["t2s_accuracy_mask"])
        align = dwa.dwa_token_alignment
        eta = None
        if align == "exact":
            s2t, init = v2.dskdv2_s2t, v2.dskdv2_projector_init
            s_head, t_head, overlap = heads_and_overlap(resources, init, s2t)
            eta = dict(tea2stu=shared_map_tensor(resources, dims, "dwa_kd"), s2t=s2t, init=init,
                       student_head=s_head, teacher_head=t_head, overlap=overlap,
                       agreement=v2.dskdv2_t2s_agreement, normalization=v2.dskdv2_normalization)
        return cls(dims.student_hidden, dims.teacher_hidden, token_alignment=align,
                   dtw_rate=dwa.dwa_dtw_rate, gamma=dwa.dwa_gamma, kd_rate=kw["kd_rate"], label_smoothing=kw["label_smoothing"], cma_options=cma_options,
                   projector_config_path=kw["projector_config_path"], projector_path=kw["projector_path"], eta=eta)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        name = "dwa_kd"
        h_s, h_t = require_hidden(student, "student", name), require_hidden(teacher, "teacher", name)
        labels, t_labels = batch["labels"], teacher_labels(batch)
        n_tokens = count_tokens(labels)
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        loss = ce
        if self.kd_rate != 0.0:
            w_s, w_t = dual_space_weights(student.logits, teacher.logits, labels, t_labels)
            if self.token_alignment == "cma":
                terms = cma_losses(
                    student_logits=student.logits, student_hidden=h_s, teacher_logits=teacher.logits,
                    teacher_hidden=h_t, input_ids=batch["input_ids"], labels=labels,
                    teacher_input_ids=teacher_input_ids(batch), teacher_labels=t_labels,
                    student_embed=student.embed_tokens, teacher_embed=teacher.embed_tokens,
                    student_head_weight=student.lm_head_weight, teacher_head_weight=teacher.lm_head_weight,
                    query_proj=self.projectors["query"], t2s_proj=self.projectors["t2s"],
                    s2t_proj=self.projectors["s2t"], t2s_weights=w_s, s2t_weights=w_t, **self.cma_options)
                kd = terms.kd
                metrics.update(terms.metrics)
            else:
                if "exact_teacher_index" not in batch:
                    raise KeyError(f"{name}: the batch lacks 'exact_teacher_index'; build the data with "
                                   "alignment=('exact',)")
                o = self.cma_options
                terms = eta_dual_space_terms(
                    student_logits=student.logits, student_hidden=h_s, teacher_logits=teacher.logits,
                    teacher_hidden=h_t, labels=labels, teacher_labels=t_labels,
                    exact_index=batch["exact_teacher_index"], tea2stu=self.tea2stu,
                    t2s_proj=self.eta_projectors.t2s, s2t_map=self.eta_projectors.s2t_map(student.lm_head_weight),
                    student_head_weight=student.lm_head_weight, teacher_head_weight=teacher.lm_head_weight,
                    kd_divergence=o["kd_divergence"], temperature=o["temperature"], tau_squared=o["tau_squared"],
                    agreement_threshold=self.eta_agreement, student_weights=w_s, teacher_weights=w_t)
                kd = normalize_terms(terms, n_tokens, self.eta_normalization)
                metrics.update(eta_metrics(terms))
            loss = loss + self.kd_rate * kd
            metrics["kd_loss"] = kd.detach()
        if self.dtw_rate > 0.0:
            embed, hidden = dtw_terms(student_hidden=h_s, teacher_hidden=h_t, labels=labels, teacher_labels=t_labels,
                                      student_embed=student.embed_tokens, teacher_embed=teacher.embed_tokens,
                                      embed_proj=self.projectors["dtw_embed"], hidden_proj=self.projectors["dtw_hidden"],
                                      gamma=self.gamma)
            dtw = (embed + hidden).sum()
            loss = loss + self.dtw_rate * dtw
            metrics.update(dtw_loss=dtw.detach(), **{"stat/dtw_embed_per_example": embed.detach().mean(),
                                                    "stat/dtw_hidden_per_example": hidden.detach().mean()})
        metrics["loss"] = loss.detach()
        return CriterionOutput(loss, n_tokens, metrics)
