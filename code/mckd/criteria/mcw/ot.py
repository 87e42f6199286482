"""MCW-KD's two multi-cost OT terms as pure, batched tensor functions.

Rows of every transport problem are teacher positions (``M = T_t``), columns student positions
(``N = T_s``); which positions take part is given by the masks (padding and excluded positions carry
no mass), so one batched Sinkhorn call solves all examples at once.

Logit level: the top-``K`` logit values of student and teacher (ranks only, the token
identities are dropped as in ULD), an interpolated teacher ``(1 - t) s + t t`` and softmax at
temperature ``tau``; costs L2 and KL between the rank distributions and the salience difference.

Hidden level: the teacher's last hidden state projected to the student space (``ot``
projector) against the student's; costs alignment (published DTW edit cost or 1 - IoU of the
character spans), context L2 (divided by its per-example max) and context cosine distance, on
context means over windows of ``2 w + 1`` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mckd.criteria.common import upcast
from mckd.ot.costs import (alignment_cost_from_pairs, context_mean, masked_max, masked_mean, pairwise_cosine_distance,
                           pairwise_kl, pairwise_l2, salience_cost, span_iou_cost)
from mckd.ot.sinkhorn import SinkhornResult, relative_epsilon, sinkhorn


def interpolation_weight(step: int, total_steps: int, start: float = 0.1) -> float:
    """Teacher share of the interpolated target: ``t = start + (1 - start) * min(step / total, 1)``.

    ``step`` counts optimizer steps (the published code counted micro-batches).
    """
    frac = min(step / total_steps, 1.0) if total_steps and total_steps > 0 else 0.0
    return start + (1.0 - start) * max(frac, 0.0)


def aligned_student_index(align_cost: torch.Tensor, student_mask: torch.Tensor) -> torch.Tensor:
    """For each teacher position, the valid student position of lowest alignment cost.

    Args:
        align_cost: (B, T_t, T_s) e.g. 1 - IoU of character spans.
        student_mask: (B, T_s) bool.

    Returns:
        (B, T_t) long (0 when the example has no valid student position).
    """
    c = align_cost.masked_fill(~student_mask.bool()[:, None, :], float("inf"))
    return c.argmin(-1)


def _topk_values(logits: torch.Tensor, k: int, rows_mask: torch.Tensor | None) -> torch.Tensor:
    """Sorted top-``k`` logit values (fp32) on the span of positions ``[lo, hi)`` that holds every
    row of ``rows_mask`` (the other rows are 0).

    The span is a view of the logits (no copy) and costs one host synchronisation; gathering the
    individual rows instead measured slower on CPU (the copy of the selected vocabulary rows costs
    more than the top-k it saves), so only the leading and trailing positions that no example needs
    (prompts for response positions, right padding) are skipped.

    Args:
        logits: (B, T, V). k: K. rows_mask: (B, T) bool or None (every row).

    Returns:
        (B, T, K).
    """
    if rows_mask is None:
        return upcast(logits.topk(k, dim=-1).values)
    T = rows_mask.shape[1]
    used = rows_mask.any(0)                                                      # (T,)
    pos = torch.arange(T, device=used.device)
    lo, hi = torch.stack([torch.where(used, pos, T).min(), torch.where(used, pos + 1, 0).max()]).tolist()
    hi = max(hi, lo)
    vals = upcast(logits[:, lo:hi].topk(k, dim=-1).values)                       # (B, hi - lo, K)
    return torch.nn.functional.pad(vals, (0, 0, lo, T - hi))


def needed_student_rows(student_mask: torch.Tensor, teacher_mask: torch.Tensor,
                        pairing: torch.Tensor | None) -> torch.Tensor:
    """Student rows whose top-k values the OT terms use: the student support plus the rows the
    interpolated targets of the teacher support read (position ``i`` or ``pairing[:, i]``).

    Args:
        student_mask: (B, T_s) bool; teacher_mask: (B, T_t) bool; pairing: (B, T_t) long or None.

    Returns:
        (B, T_s) bool.
    """
    T_s, T_t = student_mask.shape[1], teacher_mask.shape[1]
    if pairing is None:
        read = teacher_mask[:, :T_s] if T_t >= T_s else torch.nn.functional.pad(teacher_mask, (0, T_s - T_t))
        return student_mask | read
    hits = torch.zeros_like(student_mask, dtype=torch.int32).scatter_add_(1, pairing, teacher_mask.to(torch.int32))
    return student_mask | (hits > 0)


def topk_distributions(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int,
                       temperature: float, t: float, pairing: torch.Tensor | None = None,
                       detach_student: bool = False, teacher_mask: torch.Tensor | None = None,
                       student_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank distributions of the student and of the interpolated teacher.

    ``s = topk(z_s)``, ``u = topk(z_t)`` (sorted values, fp32); the target row ``i`` is
    ``(1 - t) * s[pair(i)] + t * u[i]`` where ``pair(i) = i`` when ``pairing`` is None (the published
    position-wise mix; teacher rows beyond the student length mix with 0) or ``pairing[:, i]``.

    Args:
        student_logits: (B, T_s, V_s).
        teacher_logits: (B, T_t, V_t).
        k: retained ranks (clipped to the smaller vocabulary).
        temperature: softmax temperature ``tau`` of both distributions.
        t: teacher share of the interpolation.
        pairing: optional (B, T_t) long student position for every teacher position.
        detach_student: stop the gradient through the student part of the target.
        teacher_mask, student_mask: optional (B, T_t) / (B, T_s) bool OT supports. Given both, the
            top-k skips the leading and trailing positions no example uses (see
            :func:`needed_student_rows` and :func:`_topk_values`); those rows hold the distribution
            of all-zero values (uniform), which the masked OT never reads, so the OT values and
            gradients are unchanged.

    Returns:
        ``(p_s, p_t)``: (B, T_s, K) and (B, T_t, K) fp32 probabilities.
    """
    k = min(k, student_logits.shape[-1], teacher_logits.shape[-1])
    need_s = need_t = None
    if teacher_mask is not None and student_mask is not None:
        need_t = teacher_mask.bool()
        need_s = needed_student_rows(student_mask.bool(), need_t, pairing)
    s_top = _topk_values(student_logits, k, need_s)                              # (B, T_s, K)
    u_top = _topk_values(teacher_logits.detach(), k, need_t).to(s_top.dtype)     # (B, T_t, K)
    s_side = s_top.detach() if detach_student else s_top
    T_t, T_s = u_top.shape[1], s_top.shape[1]
    if pairing is None:
        s_rows = s_side[:, :T_t] if T_s >= T_t else torch.nn.functional.pad(s_side, (0, 0, 0, T_t - T_s))
    else:
        s_rows = s_side.gather(1, pairing[:, :, None].expand(-1, -1, k))        # (B, T_t, K)
    mixed = (1.0 - t) * s_rows + t * u_top
    return torch.softmax(s_top / temperature, -1), torch.softmax(mixed / temperature, -1)


def logit_costs(p_t: torch.Tensor, p_s: torch.Tensor, salience_t: torch.Tensor,
                salience_s: torch.Tensor) -> list[torch.Tensor]:
    """The three logit-level costs, each (B, T_t, T_s): L2, KL(p_t,i || p_s,j), salience.

    Args:
        p_t: (B, T_t, K); p_s: (B, T_s, K); salience_t: (B, T_t); salience_s: (B, T_s).
    """
    return [pairwise_l2(p_t, p_s), pairwise_kl(p_t, p_s), salience_cost(salience_t, salience_s)]


def hidden_costs(teacher_hidden_s: torch.Tensor, student_hidden: torch.Tensor, teacher_mask: torch.Tensor,
                 student_mask: torch.Tensor, align: torch.Tensor, window: int) -> list[torch.Tensor]:
    """The three hidden-level costs, each (B, T_t, T_s): alignment, context L2 / max, context cosine.

    Args:
        teacher_hidden_s: (B, T_t, D_s) teacher hidden states projected to the student space.
        student_hidden: (B, T_s, D_s).
        teacher_mask: (B, T_t) bool; student_mask: (B, T_s) bool (define the context windows).
        align: (B, T_t, T_s) alignment cost (constant).
        window: context half width.
    """
    ctx_t = context_mean(upcast(teacher_hidden_s), teacher_mask, window)
    ctx_s = context_mean(upcast(student_hidden), student_mask, window)
    l2 = pairwise_l2(ctx_t, ctx_s)
    l2 = l2 / (masked_max(l2, teacher_mask, student_mask) + 1e-7)[:, None, None]
    return [align.to(l2.dtype), l2, pairwise_cosine_distance(ctx_t, ctx_s)]


def alignment_cost(batch: dict[str, torch.Tensor], kind: str, teacher_len: int, student_len: int) -> torch.Tensor:
    """(B, T_t, T_s) alignment cost from the batch: ``"dtw"`` (published, from the data pipeline's
    ``dtw_*`` keys) or ``"span_iou"`` (1 - IoU of ``teacher_offsets`` / ``offsets``)."""
    if kind == "dtw":
        missing = [key for key in ("dtw_index", "dtw_value", "dtw_mask") if key not in batch]
        if missing:
            raise KeyError(f"mcw_kd --mcw-align-cost dtw: batch lacks {missing}; the data pipeline adds them "
                           f"when the criterion lists 'dtw' in its alignment features")
        return alignment_cost_from_pairs(batch["dtw_index"], batch["dtw_value"], batch["dtw_mask"],
                                         teacher_len, student_len)
    if kind == "span_iou":
        for key in ("offsets", "teacher_offsets"):
            if key not in batch:
                raise KeyError(f"mcw_kd --mcw-align-cost span_iou: batch lacks {key!r} (character offsets)")
        return span_iou_cost(batch["teacher_offsets"], batch["offsets"])
    raise ValueError(f"--mcw-align-cost: unknown alignment cost {kind!r}")


@dataclass
class MultiCostOT:
    """Result of :func:`multi_cost_ot`: ``value`` (B,) carries the gradient."""

    value: torch.Tensor
    epsilon: torch.Tensor
    result: SinkhornResult


def multi_cost_ot(costs: list[torch.Tensor], weights: torch.Tensor, teacher_mask: torch.Tensor,
                  student_mask: torch.Tensor, *, epsilon: float, epsilon_mode: str, n_iters: int,
                  grad: str) -> MultiCostOT:
    """Entropic OT on the weighted cost ``sum_k w_k C_k``.

    Args:
        costs: list of K (B, T_t, T_s) costs.
        weights: (K,) simplex weights (no gradient).
        teacher_mask: (B, T_t) bool row support; student_mask: (B, T_s) bool column support.
        epsilon: absolute eps (``epsilon_mode="absolute"``) or the multiplier of the per-example
            mean/median of the combined cost (``"mean"``/``"median"``).
        n_iters: Sinkhorn iterations; grad: ``"envelope"`` or ``"unrolled"``.
    """
    w = weights.detach().to(costs[0].dtype)
    total = sum(w[i] * c for i, c in enumerate(costs))                            # (B, T_t, T_s)
    if epsilon_mode == "absolute":
        eps = torch.full((total.shape[0],), float(epsilon), device=total.device)
    else:
        eps = relative_epsilon(total, teacher_mask, student_mask, scale=epsilon, statistic=epsilon_mode)
    res = sinkhorn(total, teacher_mask, student_mask, epsilon=eps, n_iters=n_iters, grad=grad)
    return MultiCostOT(value=res.value, epsilon=eps, result=res)


def cost_statistics(costs: list[torch.Tensor], plan: torch.Tensor, teacher_mask: torch.Tensor,
                    student_mask: torch.Tensor, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cost statistic summed over the examples that carry mass (no gradient).

    Args:
        costs: K (B, T_t, T_s) costs; plan: (B, T_t, T_s) transport plan.
        statistic: ``"mean_cost"`` (mean valid entry) or ``"plan_ratio"`` (<P, C_k> / mean(C_k)).

    Returns:
        ``(sums (K,), n_examples ())``: divide to get the batch mean.
    """
    with torch.no_grad():
        has = (teacher_mask.any(1) & student_mask.any(1)).float()                # (B,)
        out = []
        for c in costs:
            c = c.detach().float()
            mean = masked_mean(c, teacher_mask, student_mask)                    # (B,)
            if statistic == "plan_ratio":
                # A cost that is ~0 everywhere (e.g. KL between identical rows, which the 1e-7 floor
                # can make slightly negative) says nothing about the alignment: ratio -> 1.
                pc = (plan.detach().float() * c).sum((1, 2))
                stat = (pc.clamp_min(0) + 1e-6) / (mean.clamp_min(0) + 1e-6)
            elif statistic == "mean_cost":
                stat = mean
            else:
                raise ValueError(f"--mcw-weight-statistic: unknown statistic {statistic!r}")
            out.append((stat * has).sum())
        return torch.stack(out), has.sum()
