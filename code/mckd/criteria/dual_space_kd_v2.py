"""``dual_space_kd_v2``: DSKDv2's dual-space KD on exactly aligned tokens, any pair of tokenizers.

DSKDv2 (Zhang et al., "A Dual-Space Framework for General Knowledge Distillation of Large Language
Models", arXiv 2504.11426; math read from songmzhang/DSKDv2 at commit 5025279, criterion
``dual_space_kd_v2_with_eta``) replaces DSKD-CMA's learned attention with the exact token
alignment of the data pipeline (``batch["exact_teacher_index"]``, :mod:`mckd.data.alignment`).
For every exactly aligned pair ``(i, j)`` of label positions whose teacher prediction
``t_j = argmax z_t[j]`` has a student token with the same string (``a_j = map(t_j)``, the
shared-string map of :mod:`mckd.data.shared_vocab`):

    z_t2s[i] = P_t2s(h_t[j]) W_s^T                   (student head detached)
    z_s2t[j] = (h_s[i] S) W_t^T                      (S: the s2t map, below)
    t2s_ce   = mean_pairs CE(z_t2s, a)
    t2s_kd   = mean_{pairs in A} D_tau(z_s[i] || sg(z_t2s[i]))
    s2t_kd   = mean_pairs D_tau(z_s2t[j] || z_t[j])
    KD       = t2s_ce + t2s_kd + s2t_kd,   loss = (1 - l) CE + l KD

with ``D`` the ``--kd-objective`` divergence in both spaces and ``A`` the *agreement* pairs
(``argmax z_t2s = a``) when the agreement rate is at most ``--dskdv2-t2s-agreement`` (default 1.0:
always), else all pairs. Projectors (published ``--init-t2s-projector --init-s2t-projector``):

* ``P_t2s``: bias-free ``Linear(D_t, D_s)`` initialised to ``(W_t[O_t]^T pinv(W_s[O_s]^T))^T`` so
  that ``P_t2s(h) W_s[O_s]^T = h W_t[O_t]^T`` as closely as least squares allows on the overlap
  ``O`` (token strings present in both vocabularies, word markers unified); trained.
* ``S`` (``--dskdv2-s2t pinv``): no parameters, ``S = W_s[O_s]^T pinv(W_t[O_t]^T)`` recomputed from
  the current (detached) student head at every step, so ``h_s S W_t[O_t]^T`` reproduces the
  student's own logits on the overlap; ``linear`` uses a trained bias-free ``Linear(D_s, D_t)``.

Normalisation (``--dskdv2-normalization``): ``aligned`` (published) takes each term's mean over its
pairs; the criterion returns it times the micro-batch's label-token count, so that after the loop's
division by that count it is exactly the published value. ``labels`` returns the plain sums (each
term then weighs by how many positions are aligned).

Differences from the published code (docs/criteria.md): batched (one gather for the pairs instead
of a Python loop over examples and pairs); alignment from character offsets computed once per
example instead of from marker-stripped token strings at every step; a teacher prediction whose
string is not in the student vocabulary drops the pair (the published ``convert_tokens_to_ids``
returned the unknown-token id, which for GPT-2 is the eos); sequences of different lengths on the
two sides are handled (the published buffers assumed both padded to one length).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from mckd.criteria.base import Criterion, CriterionOutput, ModelDims, ModelView, register_criterion
from mckd.criteria.common import (combine_losses, count_tokens, head_logits, label_mask, require_hidden,
                                  teacher_labels, upcast)
from mckd.criteria.cross_entropy import sft_terms
from mckd.criteria.divergences import Divergence, forward_kl, get_divergence
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions, OptionGroup
from mckd.models.projectors import load_projector_weights
from mckd.options import opt

logger = logging.getLogger(__name__)

S2T_MODES = ("pinv", "linear")
PROJECTOR_INITS = ("pinv", "random")
NORMALIZATIONS = ("aligned", "labels")
INDEX_KEY = "exact_teacher_index"


@dataclass(frozen=True)
class DSKDv2Options(OptionGroup):
    """dual_space_kd_v2 (also dwa_kd with --dwa-token-alignment exact)"""

    dskdv2_s2t: str = opt("pinv", "teacher-space map: pinv = W_s[O]^T pinv(W_t[O]^T) from the current "
                          "student head (published --init-s2t-projector); linear = a trained "
                          "Linear(D_s, D_t)", choices=S2T_MODES)
    dskdv2_projector_init: str = opt("pinv", "t2s projector initialisation (published "
                                     "--init-t2s-projector: pinv)", choices=PROJECTOR_INITS)
    dskdv2_t2s_agreement: float = opt(1.0, "t2s KD only on pairs where the projected teacher keeps "
                                      "its own prediction when that rate is <= this value "
                                      "(published --t2s-agreement 1.0: always)")
    dskdv2_normalization: str = opt("aligned", "aligned: each KD term is its mean over the aligned "
                                    "pairs (published); labels: sums divided by the label-token "
                                    "count like CE", choices=NORMALIZATIONS)


_V2 = DSKDv2Options()  # its defaults as values, for the constructors below


def exact_pairs(exact_index: torch.Tensor, labels: torch.Tensor,
                teacher_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat rows of the exactly aligned label pairs (one host synchronisation for their count).

    Args:
        exact_index: (B, T_s) long, teacher position or -1.
        labels: (B, T_s); teacher_labels: (B, T_t).

    Returns:
        ``(rows_s, rows_t)``: (n,) long indices into the flattened (B * T_s) and (B * T_t) positions.
    """
    if exact_index.shape != labels.shape:
        raise ValueError(f"{INDEX_KEY} {tuple(exact_index.shape)} does not match labels {tuple(labels.shape)}")
    T_s, T_t = labels.shape[1], teacher_labels.shape[1]
    j = exact_index.clamp(0, T_t - 1)
    ok = label_mask(labels) & exact_index.ge(0) & exact_index.lt(T_t) & label_mask(teacher_labels).gather(1, j)
    b, i = ok.nonzero(as_tuple=True)
    return b * T_s + i, b * T_t + j[b, i]


def overlap_ids(student_tokenizer, teacher_tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the token strings present in both vocabularies, word markers "Ġ"/"▁" unified
    (the published projector-initialisation overlap), in the student vocabulary's order."""
    s_vocab = {k.replace("Ġ", "▁"): v for k, v in student_tokenizer.get_vocab().items()}
    t_vocab = {k.replace("Ġ", "▁"): v for k, v in teacher_tokenizer.get_vocab().items()}
    common = sorted((v, k) for k, v in s_vocab.items() if k in t_vocab)
    return [v for v, _ in common], [t_vocab[k] for _, k in common]


def pinv_t2s_weight(student_head: torch.Tensor, teacher_head: torch.Tensor, s_ids, t_ids) -> torch.Tensor:
    """(D_s, D_t) weight of ``Linear(D_t, D_s)``: ``(W_t[O_t]^T pinv(W_s[O_s]^T))^T`` in fp32."""
    ws = student_head.detach().float()[torch.as_tensor(s_ids, dtype=torch.long)]        # (K, D_s)
    wt = teacher_head.detach().float()[torch.as_tensor(t_ids, dtype=torch.long)]        # (K, D_t)
    return (wt.T @ torch.linalg.pinv(ws.T)).T


def eta_dual_space_terms(*, student_logits: torch.Tensor, student_hidden: torch.Tensor,
                         teacher_logits: torch.Tensor, teacher_hidden: torch.Tensor,
                         labels: torch.Tensor, teacher_labels: torch.Tensor, exact_index: torch.Tensor,
                         tea2stu: torch.Tensor, t2s_proj: nn.Module, s2t_map,
                         student_head_weight: torch.Tensor, teacher_head_weight: torch.Tensor,
                         kd_divergence: Divergence = forward_kl, temperature: float = 1.0,
                         tau_squared: bool = False, agreement_threshold: float = 1.0,
                         student_weights: torch.Tensor | None = None,
                         teacher_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three DSKDv2 terms on exactly aligned pairs, as sums with the counts that average them.

    Args:
        student_logits: (B, T_s, V_s); student_hidden: (B, T_s, D_s).
        teacher_logits: (B, T_t, V_t); teacher_hidden: (B, T_t, D_t).
        labels: (B, T_s); teacher_labels: (B, T_t) (-100 = ignored).
        exact_index: (B, T_s) long, ``batch["exact_teacher_index"]``.
        tea2stu: (V_t,) long, student id with the same string as each teacher id, or -1.
        t2s_proj: D_t -> D_s module.
        s2t_map: a (D_s, D_t) tensor (the pinv map) or a D_s -> D_t module.
        student_head_weight: (V_s, D_s); teacher_head_weight: (V_t, D_t); used detached.
        kd_divergence: divergence of both KD terms. temperature: tau. tau_squared: scale by tau^2.
        agreement_threshold: t2s KD on the agreement pairs when their rate is <= this value.
        student_weights: optional (B, T_s) per-position weights of the t2s KD term (DWA-KD).
        teacher_weights: optional (B, T_t) per-position weights of the s2t KD term (DWA-KD).

    Returns:
        dict of 0-dim tensors: ``t2s_ce``, ``t2s_kd``, ``s2t_kd`` (sums, differentiable),
        ``n_pairs`` (valid pairs: the denominator of t2s_ce and s2t_kd), ``n_kd`` (denominator of
        t2s_kd), ``n_aligned`` (exactly aligned label pairs, mapped or not), ``n_agree``.
    """
    rows_s, rows_t = exact_pairs(exact_index, labels, teacher_labels)                 # (n,), (n,)
    zt = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).index_select(0, rows_t)  # (n, V_t)
    t_pred = zt.argmax(-1)
    target = tea2stu.to(t_pred.device)[t_pred.clamp_max(tea2stu.numel() - 1)]
    valid = target.ge(0) & t_pred.lt(tea2stu.numel())                                 # (n,)
    keep = valid.nonzero().squeeze(1)
    rows_s, rows_t, zt, target = rows_s[keep], rows_t[keep], zt[keep], target[keep]
    n_pairs = keep.numel()
    # student space
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows_t)
    dtype = next(t2s_proj.parameters()).dtype
    z_t2s = head_logits(t2s_proj(h_t.to(dtype)), student_head_weight)                 # (n, V_s)
    lp = torch.log_softmax(upcast(z_t2s), dim=-1)
    t2s_ce = -lp.gather(-1, target.unsqueeze(-1)).sum()
    zs = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, rows_s)  # (n, V_s)
    kd_tok = upcast(kd_divergence(zs, z_t2s.detach(), temperature=temperature, tau_squared=tau_squared))
    if student_weights is not None:
        kd_tok = kd_tok * student_weights.reshape(-1).index_select(0, rows_s).to(kd_tok.dtype)
    with torch.no_grad():
        agree = z_t2s.argmax(-1).eq(target)                                           # (n,)
        n_agree = agree.sum()
        use_agree = n_agree.to(torch.float32) <= agreement_threshold * max(n_pairs, 1)
        kd_mask = agree | ~use_agree
    t2s_kd = torch.where(kd_mask, kd_tok, kd_tok.new_zeros(())).sum()
    n_kd = torch.where(use_agree, n_agree, torch.full_like(n_agree, n_pairs))
    # teacher space
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows_s)  # (n, D_s)
    if isinstance(s2t_map, torch.Tensor):
        h_s2t = upcast(h_s) @ s2t_map.to(upcast(h_s).dtype)                            # (n, D_t)
    else:
        h_s2t = s2t_map(h_s.to(next(s2t_map.parameters()).dtype))
    z_s2t = head_logits(h_s2t, teacher_head_weight)                                   # (n, V_t)
    s2t_tok = upcast(kd_divergence(z_s2t, zt, temperature=temperature, tau_squared=tau_squared))
    if teacher_weights is not None:
        s2t_tok = s2t_tok * teacher_weights.reshape(-1).index_select(0, rows_t).to(s2t_tok.dtype)
    device = t2s_ce.device
    return {"t2s_ce": t2s_ce, "t2s_kd": t2s_kd, "s2t_kd": s2t_tok.sum(),
            "n_pairs": torch.tensor(n_pairs, device=device), "n_kd": n_kd,
            "n_aligned": torch.tensor(int(valid.numel()), device=device), "n_agree": n_agree}


def normalize_terms(terms: dict[str, torch.Tensor], n_labels: torch.Tensor, how: str) -> torch.Tensor:
    """KD token sum from :func:`eta_dual_space_terms` (see ``--dskdv2-normalization``)."""
    if how == "labels":
        return terms["t2s_ce"] + terms["t2s_kd"] + terms["s2t_kd"]
    if how != "aligned":
        raise ValueError(f"--dskdv2-normalization: unknown value {how!r}; choose one of {NORMALIZATIONS}")
    pairs = terms["n_pairs"].clamp_min(1).to(terms["t2s_ce"].dtype)
    means = (terms["t2s_ce"] + terms["s2t_kd"]) / pairs + terms["t2s_kd"] / terms["n_kd"].clamp_min(1)
    return means * n_labels.to(means.dtype)


class ExactAlignmentProjectors(nn.Module):
    """DSKDv2's projectors: a trained ``t2s`` Linear and the ``s2t`` map (pinv buffers or Linear).

    Args:
        student_hidden, teacher_hidden: D_s, D_t.
        s2t: ``"pinv"`` or ``"linear"``.
        init: ``"pinv"`` (needs the heads and overlap ids) or ``"random"``.
        student_head, teacher_head: (V_s, D_s), (V_t, D_t) output-head weights at construction.
        overlap: ``(student ids, teacher ids)`` of :func:`overlap_ids`.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, *, s2t: str = _V2.dskdv2_s2t,
                 init: str = _V2.dskdv2_projector_init, student_head: torch.Tensor | None = None,
                 teacher_head: torch.Tensor | None = None,
                 overlap: tuple[list[int], list[int]] | None = None):
        super().__init__()
        if s2t not in S2T_MODES or init not in PROJECTOR_INITS:
            raise ValueError(f"--dskdv2-s2t must be one of {S2T_MODES} and --dskdv2-projector-init one of "
                             f"{PROJECTOR_INITS}, got {s2t!r} and {init!r}")
        needs_heads = init == "pinv" or s2t == "pinv"
        if needs_heads and (student_head is None or teacher_head is None or not overlap or not overlap[0]):
            raise ValueError("dual_space_kd_v2: the pseudo-inverse projectors (--dskdv2-projector-init pinv, "
                             "--dskdv2-s2t pinv) need both output heads and a non-empty vocabulary overlap; "
                             "use --dskdv2-projector-init random --dskdv2-s2t linear otherwise")
        self.s2t_mode = s2t
        self.t2s = nn.Linear(teacher_hidden, student_hidden, bias=False)
        if init == "pinv":
            with torch.no_grad():
                self.t2s.weight.copy_(pinv_t2s_weight(student_head, teacher_head, *overlap))
        if s2t == "linear":
            self.s2t = nn.Linear(student_hidden, teacher_hidden, bias=False)
        else:
            s_ids = torch.as_tensor(overlap[0], dtype=torch.long)
            t_ids = torch.as_tensor(overlap[1], dtype=torch.long)
            pinv_t = torch.linalg.pinv(teacher_head.detach().float()[t_ids].T)          # (K, D_t)
            # derived from the teacher head and the tokenizers: rebuilt at construction, not saved
            self.register_buffer("overlap_student_ids", s_ids, persistent=False)
            self.register_buffer("teacher_head_pinv", pinv_t, persistent=False)
        if overlap is not None:
            logger.info("dual-space projectors: %d overlapping token strings", len(overlap[0]))

    def s2t_map(self, student_head_weight: torch.Tensor):
        """The s2t map for this step: (D_s, D_t) tensor (pinv mode) or the Linear module."""
        if self.s2t_mode == "linear":
            return self.s2t
        ws = student_head_weight.detach().float().index_select(0, self.overlap_student_ids)  # (K, D_s)
        return ws.T @ self.teacher_head_pinv.float()                                       # (D_s, D_t)


def heads_and_overlap(resources, init: str, s2t: str):
    """Output heads and vocabulary overlap from the loaded models/tokenizers, when needed."""
    if init != "pinv" and s2t != "pinv":
        return None, None, None
    from mckd.models.access import get_output_head

    models = (getattr(resources, "student_model", None), getattr(resources, "teacher_model", None))
    toks = (getattr(resources, "student_tokenizer", None), getattr(resources, "teacher_tokenizer", None))
    if None in models or None in toks:
        raise ValueError("dual_space_kd_v2: the pseudo-inverse projector initialisation needs the loaded "
                         "student and teacher (models and tokenizers)")
    return (get_output_head(models[0]).weight, get_output_head(models[1]).weight, overlap_ids(*toks))


def shared_map_tensor(resources, dims: ModelDims, who: str) -> torch.Tensor:
    """(V_t,) teacher id -> student id with the same string (cached per tokenizer pair)."""
    from mckd.data.shared_vocab import load_or_build_shared_vocab_map, teacher_to_student_tensor

    tok_s = getattr(resources, "student_tokenizer", None)
    tok_t = getattr(resources, "teacher_tokenizer", None)
    if tok_s is None or tok_t is None:
        raise ValueError(f"{who}: needs both tokenizers to build the shared-string vocabulary map")
    mapping, _ = load_or_build_shared_vocab_map(tok_t, tok_s)
    return teacher_to_student_tensor(mapping, dims.teacher_vocab, dims.student_vocab)


@register_criterion("dual_space_kd_v2")
class DualSpaceKDV2(Criterion):
    """DSKDv2 with exact token alignment. See the module docstring."""

    needs_teacher = True
    needs_hidden = True
    cross_tokenizer = True
    alignment = ("exact",)

    def __init__(self, student_hidden: int, teacher_hidden: int, tea2stu: torch.Tensor, *,
                 kd_rate: float = KD_DEFAULTS.kd_rate, kd_objective: str = KD_DEFAULTS.kd_objective,
                 kd_temperature: float = KD_DEFAULTS.kd_temperature,
                 tau_squared: bool = KD_DEFAULTS.kd_temperature_scaling,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing,
                 loss_combination: str = KD_DEFAULTS.loss_combination,
                 adaptive_kl_alpha: float = KD_DEFAULTS.adaptive_kl_alpha,
                 skew_lambda: float = KD_DEFAULTS.skew_lambda, s2t: str = _V2.dskdv2_s2t,
                 projector_init: str = _V2.dskdv2_projector_init,
                 t2s_agreement: float = _V2.dskdv2_t2s_agreement,
                 normalization: str = _V2.dskdv2_normalization, student_head: torch.Tensor | None = None,
                 teacher_head: torch.Tensor | None = None, overlap=None,
                 projector_path: str | None = KD_DEFAULTS.projector_path):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"--dskdv2-normalization: unknown value {normalization!r}; choose one of {NORMALIZATIONS}")
        self.projectors = ExactAlignmentProjectors(student_hidden, teacher_hidden, s2t=s2t, init=projector_init,
                                                   student_head=student_head, teacher_head=teacher_head,
                                                   overlap=overlap)
        if projector_path:
            load_projector_weights(nn.ModuleDict({"t2s": self.projectors.t2s}), projector_path)
        self.register_buffer("tea2stu", torch.as_tensor(tea2stu, dtype=torch.long), persistent=False)
        self.divergence = get_divergence(kd_objective, adaptive_kl_alpha=adaptive_kl_alpha, skew_lambda=skew_lambda)
        self.kd_rate, self.kd_temperature, self.tau_squared = kd_rate, kd_temperature, tau_squared
        self.label_smoothing, self.loss_combination = label_smoothing, loss_combination
        self.t2s_agreement, self.normalization = t2s_agreement, normalization

    option_groups = (KDOptions, DSKDv2Options)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims, resources=None) -> "DualSpaceKDV2":
        if dims.teacher_hidden is None:
            raise ValueError("dual_space_kd_v2: needs a teacher (--teacher-model-path)")
        kd, v2 = options[KDOptions], options[DSKDv2Options]
        s_head, t_head, overlap = heads_and_overlap(resources, v2.dskdv2_projector_init, v2.dskdv2_s2t)
        return cls(dims.student_hidden, dims.teacher_hidden, shared_map_tensor(resources, dims, "dual_space_kd_v2"),
                   kd_rate=kd.kd_rate, kd_objective=kd.kd_objective, kd_temperature=kd.kd_temperature,
                   tau_squared=kd.kd_temperature_scaling, label_smoothing=kd.label_smoothing,
                   loss_combination=kd.loss_combination, adaptive_kl_alpha=kd.adaptive_kl_alpha,
                   skew_lambda=kd.skew_lambda, s2t=v2.dskdv2_s2t, projector_init=v2.dskdv2_projector_init,
                   t2s_agreement=v2.dskdv2_t2s_agreement, normalization=v2.dskdv2_normalization,
                   student_head=s_head, teacher_head=t_head, overlap=overlap,
                   projector_path=kd.projector_path)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        name = "dual_space_kd_v2"
        h_s, h_t = require_hidden(student, "student", name), require_hidden(teacher, "teacher", name)
        if INDEX_KEY not in batch:
            raise KeyError(f"{name}: the batch lacks {INDEX_KEY!r}; build the data with alignment=('exact',)")
        labels = batch["labels"]
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        terms = eta_dual_space_terms(
            student_logits=student.logits, student_hidden=h_s, teacher_logits=teacher.logits, teacher_hidden=h_t,
            labels=labels, teacher_labels=teacher_labels(batch), exact_index=batch[INDEX_KEY],
            tea2stu=self.tea2stu, t2s_proj=self.projectors.t2s,
            s2t_map=self.projectors.s2t_map(student.lm_head_weight),
            student_head_weight=student.lm_head_weight, teacher_head_weight=teacher.lm_head_weight,
            kd_divergence=self.divergence, temperature=self.kd_temperature, tau_squared=self.tau_squared,
            agreement_threshold=self.t2s_agreement)
        n_tokens = count_tokens(labels)
        kd = normalize_terms(terms, n_tokens, self.normalization)
        loss = combine_losses(ce, kd, self.kd_rate, self.loss_combination, "interpolate")
        metrics.update(eta_metrics(terms), kd_loss=kd.detach(), loss=loss.detach())
        return CriterionOutput(loss, n_tokens, metrics)


def eta_metrics(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logged values: the per-pair means as statistics, the aligned count as a token sum."""
    pairs = terms["n_pairs"].clamp_min(1).float()
    return {"stat/t2s_ce_loss": terms["t2s_ce"].detach() / pairs,
            "stat/t2s_kd_loss": terms["t2s_kd"].detach() / terms["n_kd"].clamp_min(1).float(),
            "stat/s2t_kd_loss": terms["s2t_kd"].detach() / pairs,
            "stat/t2s_agreement": terms["n_agree"].float() / pairs,
            "exact_aligned_fraction": terms["n_aligned"].float()}
