"""``multi_level_ot``: Multi-Level OT baseline (Cui et al. 2025) as in the MCW-KD code.

After response-start alignment (:func:`~mckd.criteria.universal_logit_distillation.
response_start_alignment`), each position's logits are divided by (their unbiased std over the
vocabulary + 1e-4), softened with temperature 2 and reduced to K = 50 probabilities, ranked.

``variant="fixed"`` (default), on the aligned pairs ``i`` (``p``, ``q``: the K largest student /
teacher probabilities of the position, descending)::

    token level:    L1 = sum_i sum_k |p_k - q_k|,   KL = -sum_i sum_k q_k log p_k
    sequence level: OT = sum_b n_b <P_b, W_b>,  W_b[i, j] = sum_k |p_k(i) - q_k(j)|,
                    P_b = Sinkhorn(W_b, eps 0.1, 10 iterations, marginals 1/n_b), n_b aligned pairs
    multi = L1 + 0.1 KL + 0.1 * 0.001 OT,           loss = CE + l * multi   (published: additive)

``variant="published"`` reproduces the published formulas on the tensors it receives, over all
``L = min(T_s, T_t)`` rolled positions of the ``B`` examples (wrap-around like ``torch.roll``,
prompt and padding included); ``p``, ``q`` are the columns of ONE vocabulary order per side, by
probability mass summed over every position, first K kept::

    KL  = 0.1 * mean over the B*L positions of -sum_k softmax(q)_k log_softmax(p)_k
    L1  = mean over the B*L positions of sum_k |p_k - q_k|
    OT  = 0.1 * sum_b 0.001 <P_b, W_b>,  W_b[i, j] = |softmax(p(i) / 2) - softmax(q(j) / 2)|_1,
          P_b = exp(-W_b / 0.1), then 10 times: every row divided by its sum, then every column
          (column sums 1, total mass L)
    multi = (OT + KL + L1) * n_valid,   n_valid = positions labelled on both sides

The fixed variant differs from the published one in:

* no second softmax. The published code applied ``softmax(. / 2)`` to the top-K
  *probabilities* again inside the OT, and in the KL took ``log_softmax`` of the student's and
  ``softmax`` of the teacher's probabilities, which makes both sides nearly uniform; here the OT and
  KL use the top-K probabilities themselves.
* the published top-K used one vocabulary order for the whole batch (padding included), its
  L1/KL means and OT ran over all positions including prompt and padding, and the loss was that
  global scalar times the number of valid tokens. Here top-K is per position, L1 and KL are token
  sums over the aligned response pairs, and the OT of each example is a plan of unit mass
  (marginals 1/n_b) on its aligned pairs entering as ``n_b * OT_b``: the token-sum scale of the
  published plan, whose mass is its number of columns L.
* accuracy is the usual token accuracy (the published one compared unrolled logits with
  rolled labels).

With our dynamic padding the padded length is not the published 512, so the published variant
still differs numerically from a published run; it exists to measure what the fixes change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mckd.criteria.base import Criterion, CriterionOutput, ModelDims, ModelView, register_criterion
from mckd.criteria.common import combine_losses, count_tokens, masked_sum, teacher_labels, upcast
from mckd.criteria.cross_entropy import sft_terms
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions, OptionGroup
from mckd.criteria.universal_logit_distillation import gather_positions, response_start_alignment
from mckd.options import opt
from mckd.ot.sinkhorn import sinkhorn

MLOT_VARIANTS = ("fixed", "published")


@dataclass(frozen=True)
class MLOTOptions(OptionGroup):
    """multi_level_ot (hard-coded in the published code)"""

    mlot_variant: str = opt("fixed", "fixed: per-token top-k, masks, no double softmax; published: "
                                     "as published", choices=MLOT_VARIANTS)
    mlot_temperature: float = opt(2.0, "softmax temperature")
    mlot_top_k: int = opt(50, "ranked probabilities compared")
    mlot_sinkhorn_eps: float = opt(0.1, "Sinkhorn regularisation")
    mlot_sinkhorn_iters: int = opt(10, "Sinkhorn iterations")


_MLOT = MLOTOptions()  # its defaults as values, for the constructors below


def std_scaled(logits: torch.Tensor) -> torch.Tensor:
    """``z / (std(z) + 1e-4)`` per position: unbiased std over the vocabulary, no centring."""
    z = upcast(logits)
    return z / (z.std(dim=-1, keepdim=True) + 1e-4)


def _top_k_probs(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """(B, N, V) logits -> (B, N, K) largest probabilities of softmax(std_scaled / T), descending."""
    p = torch.softmax(std_scaled(logits) / temperature, dim=-1)
    return p.topk(min(top_k, p.shape[-1]), dim=-1).values


def _pad_vocab(p: torch.Tensor, k: int) -> torch.Tensor:
    return p if p.shape[-1] == k else torch.nn.functional.pad(p, (0, k - p.shape[-1]))


def multi_level_ot_fixed(zs: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor, *,
                         temperature: float = 2.0, top_k: int = 50, sinkhorn_eps: float = 0.1,
                         sinkhorn_iters: int = 10) -> dict[str, torch.Tensor]:
    """Token sums of the three levels on aligned positions.

    Args:
        zs: (B, N, V_s) student logits at the aligned positions.
        zt: (B, N, V_t) teacher logits at the aligned positions.
        valid: (B, N) bool, aligned supervised pairs.

    Returns:
        dict with ``multi`` (differentiable) and detached ``l1``, ``kl``, ``ot`` token sums.
    """
    p = _top_k_probs(zs, temperature, top_k)                                  # (B, N, K)
    with torch.no_grad():
        q = _top_k_probs(zt.detach(), temperature, top_k)
    k = max(p.shape[-1], q.shape[-1])
    p, q = _pad_vocab(p, k), _pad_vocab(q, k)
    l1 = masked_sum((p - q).abs().sum(-1), valid)
    kl = masked_sum(-(q * torch.log(p.clamp_min(1e-30))).sum(-1), valid)
    cost = torch.cdist(p, q, p=1)                                             # (B, N, N)
    ot = sinkhorn(cost, valid, valid, epsilon=sinkhorn_eps, n_iters=sinkhorn_iters,
                  grad="unrolled").value                                      # (B,)
    ot_tok = (ot * valid.sum(1)).sum()                                        # n_b * OT_b
    multi = l1 + 0.1 * kl + 0.1 * 0.001 * ot_tok
    return {"multi": multi, "l1": l1.detach(), "kl": kl.detach(), "ot": ot_tok.detach()}


def _row_column_scaled_plan(cost: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """The published plan, batched: ``exp(-C / reg)``, then ``iters`` times every row divided by
    its sum, then every column by its sum. (B, M, N) -> (B, M, N) with column sums 1."""
    plan = torch.exp(-cost / reg)
    for _ in range(iters):
        plan = plan / plan.sum(dim=2, keepdim=True)
        plan = plan / plan.sum(dim=1, keepdim=True)
    return plan


def multi_level_ot_published(zs: torch.Tensor, zt: torch.Tensor, valid: torch.Tensor, *,
                             temperature: float = 2.0, top_k: int = 50, sinkhorn_eps: float = 0.1,
                             sinkhorn_iters: int = 10) -> dict[str, torch.Tensor]:
    """The published formulas (see module docstring); ``valid`` only counts the tokens.

    Args:
        zs: (B, L, V_s) student logits at the rolled positions.
        zt: (B, L, V_t) teacher logits at the rolled positions.
        valid: (B, L) bool, positions labelled on both sides.

    Returns:
        dict with ``multi`` (differentiable) and detached ``l1``, ``kl``, ``ot`` (each times n_valid).
    """
    p = torch.softmax(std_scaled(zs) / temperature, dim=-1)                  # (B, L, V_s)
    with torch.no_grad():
        q = torch.softmax(std_scaled(zt.detach()) / temperature, dim=-1)
    # one global permutation per side, by mass over every position (padding included)
    k_s, k_t = min(top_k, p.shape[-1]), min(top_k, q.shape[-1])
    p = p.index_select(-1, p.detach().sum(dim=(0, 1)).topk(k_s).indices)
    q = q.index_select(-1, q.sum(dim=(0, 1)).topk(k_t).indices)
    k = max(k_s, k_t)
    p, q = _pad_vocab(p, k), _pad_vocab(q, k)
    # sequence level: a second softmax of the probabilities, at the same temperature
    cost = torch.cdist(torch.softmax(p / temperature, -1), torch.softmax(q / temperature, -1), p=1)
    plan = _row_column_scaled_plan(cost, sinkhorn_eps, sinkhorn_iters)
    ot = 0.1 * (0.001 * (plan * cost).sum())
    # token level: softmax of the probabilities on both sides of the KL
    kl = 0.1 * -(torch.softmax(q, dim=-1) * torch.log_softmax(p, dim=-1)).sum(-1).mean()
    l1 = (p - q).abs().sum(-1).mean()
    n_valid = valid.sum()
    multi = (ot + kl + l1) * n_valid
    return {"multi": multi, "l1": (l1 * n_valid).detach(), "kl": (kl * n_valid).detach(),
            "ot": (ot * n_valid).detach()}


@register_criterion("multi_level_ot")
class MultiLevelOT(Criterion):
    """Multi-Level OT baseline (cross tokenizer, no projectors)."""

    needs_teacher = True
    cross_tokenizer = True

    def __init__(self, kd_rate: float = KD_DEFAULTS.kd_rate,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing,
                 loss_combination: str = KD_DEFAULTS.loss_combination, variant: str = _MLOT.mlot_variant,
                 temperature: float = _MLOT.mlot_temperature, top_k: int = _MLOT.mlot_top_k,
                 sinkhorn_eps: float = _MLOT.mlot_sinkhorn_eps,
                 sinkhorn_iters: int = _MLOT.mlot_sinkhorn_iters):
        super().__init__()
        if variant not in MLOT_VARIANTS:
            raise ValueError(f"--mlot-variant: unknown value {variant!r}; choose one of "
                             f"{', '.join(MLOT_VARIANTS)}")
        self.kd_rate, self.label_smoothing = kd_rate, label_smoothing
        self.loss_combination, self.variant = loss_combination, variant
        self.options = dict(temperature=temperature, top_k=top_k, sinkhorn_eps=sinkhorn_eps,
                            sinkhorn_iters=sinkhorn_iters)

    @property
    def teacher_ranks(self) -> int:
        """The ranked probabilities compared per token (``--mlot-top-k``)."""
        return self.options["top_k"]

    option_groups = (KDOptions, MLOTOptions)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims, resources=None) -> "MultiLevelOT":
        kd, ml = options[KDOptions], options[MLOTOptions]
        return cls(kd_rate=kd.kd_rate, label_smoothing=kd.label_smoothing,
                   loss_combination=kd.loss_combination, variant=ml.mlot_variant,
                   temperature=ml.mlot_temperature, top_k=ml.mlot_top_k,
                   sinkhorn_eps=ml.mlot_sinkhorn_eps, sinkhorn_iters=ml.mlot_sinkhorn_iters)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        if teacher is None:
            raise ValueError("multi_level_ot: needs a teacher, but teacher=None")
        labels = batch["labels"]
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        published = self.variant == "published"
        idx_s, idx_t, valid = response_start_alignment(labels, teacher_labels(batch), wrap=published)
        zs = gather_positions(student.logits, idx_s)                          # (B, N, V_s)
        zt = gather_positions(teacher.logits, idx_t)                          # (B, N, V_t)
        fn = multi_level_ot_published if published else multi_level_ot_fixed
        terms = fn(zs, zt, valid, **self.options)
        multi = terms.pop("multi")
        loss = combine_losses(ce, multi, self.kd_rate, self.loss_combination, "additive")
        metrics.update({f"mlot_{k}": v for k, v in terms.items()})
        metrics.update(kd_loss=multi.detach(), loss=loss.detach())
        return CriterionOutput(loss, count_tokens(labels), metrics)
