"""``uld_hybrid``: GOLD's hybrid ULD loss (TRL ``GOLDTrainer``), any pair of tokenizers.

GOLD (Hugging Face, "Unlocking On-Policy Distillation for Any Model Family"; math read from
huggingface/trl at commit f2cd577, ``trl/experimental/gold/gold_trainer.py``, ``ULDLoss`` with
``uld_use_hybrid_loss``) splits both vocabularies into the tokens whose strings exist on both sides
(``K`` of them: the shared-string map of :mod:`mckd.data.shared_vocab`, built once per tokenizer
pair and cached) and the rest. For every aligned pair of distributions ``(p, q)`` (student,
teacher):

    matched   = JSD_beta(p[S] || q[T])              on the K shared columns, S <-> T by string
    unmatched = sum_r |sort(p[~S])_r - sort(q[~T])_r|   (ULD on the rest, shorter side zero-padded)
    hybrid    = w_m * matched + w_u * unmatched,    w_m = K / V_t, w_u = 1 - w_m by default

with the generalised JSD of GKD (``beta`` 0: KL(q || p), 1: KL(p || q); the sub-vectors are not
renormalised and are clamped at 1e-8 inside the logs, as in GOLD).

Aligned pairs come from the exact token alignment of the data pipeline
(:mod:`mckd.data.alignment`): ``--uld-hybrid-positions groups`` (GOLD's extended ULD) pairs the
last tokens of every aligned *group* (``batch["boundary_teacher_index"]``: both tokenizations end a
token at the same character) and merges each group as GOLD's ``bayesian`` strategy does: the full
distribution at the group's last position times the probabilities of the group's earlier label
tokens on that side (chain rule). One-token groups are the exactly aligned positions, where nothing
is merged. ``exact`` keeps only those.

    loss = CE + l * sum over pairs of hybrid       (``--loss-combination additive``, our choice)

Differences from GOLD (docs/criteria.md): batched (GOLD loops over examples and groups); pairs come
from the cached offsets of the data pipeline; the loss is a token sum over pairs, divided by the
label-token count like every criterion here (GOLD averages per sequence, then over the batch);
positions after the last shared boundary are left out (GOLD compares the two tails as one group);
a shared string is matched once (one-to-one map); ``--uld-hybrid-beta`` defaults to 0 (forward KL
on the shared part; GOLD's config default is 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mckd.criteria.base import Criterion, CriterionOutput, ModelDims, ModelView, register_criterion
from mckd.criteria.common import (combine_losses, count_tokens, label_mask, teacher_labels,
                                  token_log_probs, upcast)
from mckd.criteria.cross_entropy import sft_terms
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions, OptionGroup
from mckd.criteria.universal_logit_distillation import sorted_l1
from mckd.options import opt

POSITIONS = ("groups", "exact")
PROB_FLOOR = 1e-8


@dataclass(frozen=True)
class ULDHybridOptions(OptionGroup):
    """uld_hybrid (GOLD)"""

    uld_hybrid_positions: str = opt("groups", "groups: every aligned group, multi-token groups merged "
                                    "by the chain rule (GOLD); exact: exactly aligned positions only",
                                    choices=POSITIONS)
    uld_hybrid_beta: float = opt(0.0, "generalised JSD on the shared vocabulary: 0 = KL(teacher || "
                                      "student) (default), 1 = reverse KL, GOLD's config default 0.5")
    uld_hybrid_matched_weight: float | None = opt(None, "weight of the shared-vocabulary term "
                                                        "(default: K / V_t, GOLD's adaptive weight)",
                                                  type=float)
    uld_hybrid_unmatched_weight: float | None = opt(None, "weight of the sorted L1 on the rest "
                                                          "(default: 1 - K / V_t)", type=float)
    uld_hybrid_keep_eos: bool = opt(False, "also compare the last label positions (GOLD skips the "
                                           "eos by default)", action="store_true")


_HYB = ULDHybridOptions()  # its defaults as values, for the constructors below


def last_label_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at the last supervised position of each row."""
    m = label_mask(labels)
    T = labels.shape[1]
    last = (m.long() * torch.arange(1, T + 1, device=labels.device)).argmax(1)         # (B,)
    return m & torch.nn.functional.one_hot(last, T).bool()


def group_log_scale(end_mask: torch.Tensor, token_logp: torch.Tensor) -> torch.Tensor:
    """For every group end, the summed log-probability of the group's earlier tokens.

    A group is the run of positions after the previous end up to and including an end.

    Args:
        end_mask: (B, T) bool, group ends.
        token_logp: (B, T) log-probability of each position's label (0 where not a label).

    Returns:
        (B, T): at every end, sum of ``token_logp`` over the other positions of its group.
    """
    ends = end_mask.long()
    gid = ends.cumsum(1) - ends                                                        # ends before t
    contrib = torch.where(end_mask, token_logp.new_zeros(()), token_logp)
    seg = token_logp.new_zeros(end_mask.shape[0], end_mask.shape[1] + 1)
    seg = seg.scatter_add(1, gid, contrib)                                             # (B, T + 1)
    return seg.gather(1, gid)


def aligned_groups(index: torch.Tensor, labels: torch.Tensor, teacher_labels: torch.Tensor,
                   skip_last: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group ends of both sides from a student->teacher index (boundary or exact).

    Args:
        index: (B, T_s) long, paired teacher position or -1.
        labels: (B, T_s); teacher_labels: (B, T_t).
        skip_last: leave out pairs at the last label of either side (GOLD skips the eos).

    Returns:
        ``(end_s, end_t, pair_t)``: (B, T_s) and (B, T_t) bool group ends, and (B, T_s) long
        teacher position of each student end (clamped, valid where ``end_s``).
    """
    T_t = teacher_labels.shape[1]
    j = index.clamp(0, T_t - 1)
    m_t = label_mask(teacher_labels)
    end_s = label_mask(labels) & index.ge(0) & index.lt(T_t) & m_t.gather(1, j)
    if skip_last:
        end_s = end_s & ~last_label_mask(labels) & ~last_label_mask(teacher_labels).gather(1, j)
    # scatter_add: several student positions may share a clamped index; only real ends count
    end_t = torch.zeros(m_t.shape, device=m_t.device).scatter_add(1, j, end_s.float()).gt(0) & m_t
    return end_s, end_t, j


def generalized_jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's generalised JSD on (possibly unnormalised) probability rows, per row.

    Args:
        p: (n, K) student probabilities; q: (n, K) teacher probabilities.
        beta: 0 gives KL(q || p), 1 gives KL(p || q); between, ``beta KL(q || m) + (1 - beta)
            KL(p || m)`` with ``m = (1 - beta) p + beta q``. Logs of values clamped at 1e-8.

    Returns:
        (n,).
    """
    lp, lq = torch.log(p.clamp_min(PROB_FLOOR)), torch.log(q.clamp_min(PROB_FLOOR))
    if beta == 0.0:
        return F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    if beta == 1.0:
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=lp.dtype, device=lp.device)
    lm = torch.logsumexp(torch.stack([lp + torch.log1p(-b), lq + torch.log(b)]), dim=0)
    kl_q = F.kl_div(lm, lq, reduction="none", log_target=True).sum(-1)
    kl_p = F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1)
    return beta * kl_q + (1.0 - beta) * kl_p


def hybrid_uld(p: torch.Tensor, q: torch.Tensor, shared_s: torch.Tensor, shared_t: torch.Tensor,
               rest_s: torch.Tensor, rest_t: torch.Tensor, *, beta: float, matched_weight: float,
               unmatched_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GOLD's hybrid loss of aligned distribution pairs.

    Args:
        p: (n, V_s) student probabilities (differentiable; merged groups may not sum to 1).
        q: (n, V_t) teacher probabilities (constants).
        shared_s, shared_t: (K,) long matched columns (same string).
        rest_s, rest_t: the other columns of each side.
        beta, matched_weight, unmatched_weight: see the module docstring.

    Returns:
        ``(matched, unmatched)``: (n,) each, unweighted.
    """
    matched = generalized_jsd(p.index_select(1, shared_s), q.index_select(1, shared_t), beta)
    unmatched = sorted_l1(p.index_select(1, rest_s), q.index_select(1, rest_t))
    return matched, unmatched


def uld_hybrid_loss(*, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    teacher_labels: torch.Tensor, index: torch.Tensor, merge: bool,
                    shared_s: torch.Tensor, shared_t: torch.Tensor, rest_s: torch.Tensor, rest_t: torch.Tensor,
                    beta: float, matched_weight: float, unmatched_weight: float, temperature: float = 1.0,
                    skip_last: bool = True) -> dict[str, torch.Tensor]:
    """Sum of the hybrid loss over aligned pairs.

    Args:
        student_logits: (B, T_s, V_s); teacher_logits: (B, T_t, V_t).
        labels: (B, T_s); teacher_labels: (B, T_t).
        index: (B, T_s) long, ``boundary_teacher_index`` (groups) or ``exact_teacher_index``.
        merge: merge multi-token groups (bayesian chain rule); False for exact pairs.
        temperature: tau of both softmaxes.
        Other arguments: see :func:`hybrid_uld`.

    Returns:
        dict: ``kd`` (0-dim sum, differentiable), ``matched``/``unmatched`` (detached sums),
        ``n_pairs`` (0-dim).
    """
    end_s, end_t, pair_t = aligned_groups(index, labels, teacher_labels, skip_last)
    T_s, T_t = labels.shape[1], teacher_labels.shape[1]
    b, i = end_s.nonzero(as_tuple=True)                                                # (n,), (n,)
    rows_s, rows_t = b * T_s + i, b * T_t + pair_t[b, i]
    zs = upcast(student_logits).reshape(-1, student_logits.shape[-1]).index_select(0, rows_s)
    zt = upcast(teacher_logits.detach()).reshape(-1, teacher_logits.shape[-1]).index_select(0, rows_t)
    p = torch.softmax(zs / temperature if temperature != 1.0 else zs, dim=-1)          # (n, V_s)
    with torch.no_grad():
        q = torch.softmax(zt / temperature if temperature != 1.0 else zt, dim=-1)      # (n, V_t)
    if merge:
        lp_s = token_log_probs(student_logits / temperature if temperature != 1.0 else student_logits, labels)
        with torch.no_grad():
            tl = teacher_logits.detach()
            lp_t = token_log_probs(tl / temperature if temperature != 1.0 else tl, teacher_labels)
            scale_t = group_log_scale(end_t, lp_t).reshape(-1).index_select(0, rows_t).exp()
        scale_s = group_log_scale(end_s, lp_s).reshape(-1).index_select(0, rows_s).exp()
        p = p * scale_s.unsqueeze(-1)
        q = q * scale_t.unsqueeze(-1)
    matched, unmatched = hybrid_uld(p, q, shared_s, shared_t, rest_s, rest_t, beta=beta,
                                    matched_weight=matched_weight, unmatched_weight=unmatched_weight)
    kd = (matched_weight * matched + unmatched_weight * unmatched).sum()
    return {"kd": kd, "matched": matched.detach().sum(), "unmatched": unmatched.detach().sum(),
            "n_pairs": torch.tensor(rows_s.numel(), device=kd.device)}


def complement(ids: torch.Tensor, size: int) -> torch.Tensor:
    """(size - K,) ascending ids not in ``ids``."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().squeeze(1)


@register_criterion("uld_hybrid")
class ULDHybrid(Criterion):
    """GOLD's hybrid ULD on exactly aligned groups. See the module docstring.

    Args:
        tea2stu: (V_t,) long, student id with the same string as each teacher logit column, or -1.
        student_vocab: V_s (size of the student logits).
        kd_rate: lambda. positions: "groups" or "exact". beta: JSD interpolation.
        matched_weight, unmatched_weight: both None (adaptive K / V_t and 1 - K / V_t) or both set.
    """

    needs_teacher = True
    cross_tokenizer = True
    alignment = ("exact",)

    def __init__(self, tea2stu: torch.Tensor, student_vocab: int, *, kd_rate: float = KD_DEFAULTS.kd_rate,
                 positions: str = _HYB.uld_hybrid_positions, beta: float = _HYB.uld_hybrid_beta,
                 matched_weight: float | None = _HYB.uld_hybrid_matched_weight,
                 unmatched_weight: float | None = _HYB.uld_hybrid_unmatched_weight,
                 kd_temperature: float = KD_DEFAULTS.kd_temperature, skip_eos: bool = True,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing,
                 loss_combination: str = KD_DEFAULTS.loss_combination):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"--uld-hybrid-positions: unknown value {positions!r}; choose one of {POSITIONS}")
        if (matched_weight is None) != (unmatched_weight is None):
            raise ValueError("--uld-hybrid-matched-weight and --uld-hybrid-unmatched-weight must be given "
                             "together (or neither, for the adaptive K / V_t weights)")
        if not 0.0 <= beta <= 1.0 or kd_temperature <= 0:
            raise ValueError(f"--uld-hybrid-beta must be in [0, 1] and --kd-temperature > 0, got {beta}, "
                             f"{kd_temperature}")
        tea2stu = torch.as_tensor(tea2stu, dtype=torch.long)
        shared_t = torch.nonzero((tea2stu >= 0) & (tea2stu < student_vocab)).squeeze(1)
        shared_s = tea2stu[shared_t]
        V_t = tea2stu.numel()
        if matched_weight is None:
            matched_weight = shared_t.numel() / max(V_t, 1)
            unmatched_weight = 1.0 - matched_weight
        # derived from the tokenizers: rebuilt at construction, not saved in checkpoints
        for name, t in (("shared_s", shared_s), ("shared_t", shared_t),
                        ("rest_s", complement(shared_s, student_vocab)), ("rest_t", complement(shared_t, V_t))):
            self.register_buffer(name, t, persistent=False)
        self.kd_rate, self.positions, self.beta = kd_rate, positions, beta
        self.matched_weight, self.unmatched_weight = float(matched_weight), float(unmatched_weight)
        self.kd_temperature, self.skip_eos = kd_temperature, skip_eos
        self.label_smoothing, self.loss_combination = label_smoothing, loss_combination

    option_groups = (KDOptions, ULDHybridOptions)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims, resources=None) -> "ULDHybrid":
        from mckd.criteria.dual_space_kd_v2 import shared_map_tensor

        kd, uh = options[KDOptions], options[ULDHybridOptions]
        return cls(shared_map_tensor(resources, dims, "uld_hybrid"), dims.student_vocab, kd_rate=kd.kd_rate,
                   positions=uh.uld_hybrid_positions, beta=uh.uld_hybrid_beta,
                   matched_weight=uh.uld_hybrid_matched_weight,
                   unmatched_weight=uh.uld_hybrid_unmatched_weight,
                   kd_temperature=kd.kd_temperature, skip_eos=not uh.uld_hybrid_keep_eos,
                   label_smoothing=kd.label_smoothing, loss_combination=kd.loss_combination)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        if teacher is None:
            raise ValueError("uld_hybrid: needs a teacher, but teacher=None")
        key = "boundary_teacher_index" if self.positions == "groups" else "exact_teacher_index"
        if key not in batch:
            raise KeyError(f"uld_hybrid: the batch lacks {key!r}; build the data with alignment=('exact',)")
        labels = batch["labels"]
        if teacher.logits.shape[-1] != self.rest_t.numel() + self.shared_t.numel():
            raise ValueError(f"uld_hybrid: the teacher logits have {teacher.logits.shape[-1]} columns but the "
                             f"vocabulary map covers {self.rest_t.numel() + self.shared_t.numel()}")
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        out = uld_hybrid_loss(student_logits=student.logits, teacher_logits=teacher.logits, labels=labels,
                              teacher_labels=teacher_labels(batch), index=batch[key],
                              merge=self.positions == "groups", shared_s=self.shared_s, shared_t=self.shared_t,
                              rest_s=self.rest_s, rest_t=self.rest_t, beta=self.beta,
                              matched_weight=self.matched_weight, unmatched_weight=self.unmatched_weight,
                              temperature=self.kd_temperature, skip_last=self.skip_eos)
        kd = out["kd"]
        loss = combine_losses(ce, kd, self.kd_rate, self.loss_combination, "additive")
        metrics.update(kd_loss=kd.detach(), loss=loss.detach(), matched_loss=out["matched"],
                       unmatched_loss=out["unmatched"], aligned_fraction=out["n_pairs"].float())
        if "exact_teacher_index" in batch:
            exact = label_mask(labels) & batch["exact_teacher_index"].ge(0)
            metrics["exact_aligned_fraction"] = exact.sum().float()
        return CriterionOutput(loss, count_tokens(labels), metrics)
