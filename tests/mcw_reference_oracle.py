"""Per-example loop oracle of the PUBLISHED MCW-KD OT math, written from its formulas (the ETP
solver and the logit- and hidden-space OT terms), for tests and the benchmark. Deliberately literal and slow: Python loops over examples
and positions, a full-vocabulary sort, the (M, N, K) KL tensor and the scaling-form ETP solver.

Differences from the published code that are not about the math (both sides of the comparison
share them): the step counter is an argument (the published code counted micro-batches), the
missing ``ot_weight_*`` attributes are taken as 1, the salience head has the right input size, and
everything runs in the caller's dtype (the published code ran in bf16 under the bf16 scripts).
"""
from __future__ import annotations

import torch


def etp(cost: torch.Tensor, alpha: float = 0.1, n_iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """The published ``ETP`` solver: uniform marginals, ``K = exp(-alpha C)``,
    ``v = b / (K^T u + 1e-9)``, ``u = a / (K v + 1e-9)``, ``u`` starting at ``1/M``.

    Args:
        cost: (M, N).

    Returns:
        ``(<P, C>, P)``.
    """
    M, N = cost.shape
    a = torch.full((M, 1), 1.0 / M, dtype=cost.dtype)
    b = torch.full((N, 1), 1.0 / N, dtype=cost.dtype)
    u = torch.full((M, 1), 1.0 / M, dtype=cost.dtype)
    K = torch.exp(-alpha * cost)
    for _ in range(n_iters):
        v = b / (K.T @ u + 1e-9)
        u = a / (K @ v + 1e-9)
    P = u * K * v.T
    return (P * cost).sum(), P


def context_loop(x: torch.Tensor, window: int = 4) -> torch.Tensor:
    """``ctx(X)_i = mean(X[max(i - w, 0) : min(i + w, n - 1) + 1])`` with a loop over positions."""
    n = x.shape[0]
    rows = []
    for i in range(n):
        lo, hi = max(i - window, 0), min(i + window, n - 1)
        rows.append(x[lo:hi + 1].mean(0))
    return torch.stack(rows)


def interpolated_topk(student_logits, teacher_logits, k: int, t: float, tau: float = 2.0):
    """Spec 7.3: full descending sort, first k values, position-wise interpolation, softmax(./tau).

    The published code padded both models to the same length; where the teacher sequence is longer
    the student rows are taken as 0 (our documented choice for dynamic padding).
    """
    s = torch.sort(student_logits, dim=-1, descending=True).values[..., :k]
    u = torch.sort(teacher_logits, dim=-1, descending=True).values[..., :k]
    T_t = u.shape[1]
    s_rows = torch.zeros_like(u)
    n = min(T_t, s.shape[1])
    s_rows[:, :n] = s[:, :n]
    mixed = (1 - t) * s_rows + t * u
    return torch.softmax(s / tau, -1), torch.softmax(mixed / tau, -1)


def published_ot_logits(student_logits, teacher_logits, h_s, h_t, s_mask, t_mask, ot_projector, salience_head,
                        weights, *, k: int, t: float, tau: float = 2.0, alpha: float = 0.1, n_iters: int = 100):
    """``compute_ot_logits`` (the published logit-space OT term) as a loop over examples. Returns (mean over B, per-example list)."""
    P_s, P_t = interpolated_topk(student_logits, teacher_logits, k, t, tau)
    per = []
    for b in range(student_logits.shape[0]):
        tp, sp = P_t[b][t_mask[b]], P_s[b][s_mask[b]]                  # (M, k), (N, k)
        c2 = torch.cdist(tp, sp)
        c4 = (tp[:, None, :] * (torch.log(tp[:, None, :]) - torch.log(sp[None, :, :] + 1e-7))).sum(-1)
        g = ot_projector(h_t[b])[t_mask[b]]
        hs = h_s[b][s_mask[b]]
        sal_t = torch.sigmoid(salience_head(g))                        # (M, 1)
        sal_s = torch.sigmoid(salience_head(hs))                       # (N, 1)
        csal = (sal_t - sal_s.T).abs()
        cost = weights[0] * c2 + weights[1] * c4 + weights[2] * csal
        per.append(etp(cost, alpha, n_iters)[0])
    return sum(per) / len(per), per


def published_ot_hidden(h_s, h_t, s_mask, t_mask, ot_projector, dtw_costs, weights, *, window: int = 4,
                        alpha: float = 0.1, n_iters: int = 100):
    """``compute_ot_hidden`` (the published hidden-space OT term) as a loop over examples.

    Args:
        dtw_costs: per example the (M, N) edit-distance DTW cost over the masked positions.
    """
    G = ot_projector(h_t)
    per = []
    for b in range(h_s.shape[0]):
        T, S = G[b][t_mask[b]], h_s[b][s_mask[b]]
        ct, cs = context_loop(T, window), context_loop(S, window)
        c5 = torch.cdist(ct, cs)
        c5 = c5 / (c5.max() + 1e-7)
        ctn = ct / (ct.norm(dim=-1, keepdim=True) + 1e-7)
        csn = cs / (cs.norm(dim=-1, keepdim=True) + 1e-7)
        c6 = 1 - ctn @ csn.T
        cost = weights[0] * dtw_costs[b] + weights[1] * c5 + weights[2] * c6
        per.append(etp(cost, alpha, n_iters)[0])
    return sum(per) / len(per), per


def published_qp(costs, sigma: float = 2.0, floor: float = 0.01):
    """The cost-weight QP solved from its KKT conditions by bisection on the multiplier:
    ``alpha_i = max(floor, 1/K - (c_i + nu) / (2 sigma))`` with ``nu`` such that ``sum alpha = 1``
    (a different algorithm from the library's sort-based projection)."""
    c = [float(x) for x in costs]
    K = len(c)

    def alpha(nu):
        return [max(floor, 1.0 / K - (ci + nu) / (2 * sigma)) for ci in c]

    lo, hi = -max(c) - 4 * sigma, -min(c) + 4 * sigma   # sum(alpha(lo)) >= 1 >= sum(alpha(hi))
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(alpha(mid)) > 1:
            lo = mid
        else:
            hi = mid
    return torch.tensor(alpha((lo + hi) / 2), dtype=torch.float64)


def qp_objective(alpha, costs, sigma: float = 2.0) -> float:
    a = torch.as_tensor(alpha, dtype=torch.float64)
    c = torch.as_tensor(costs, dtype=torch.float64)
    return float(c @ a + sigma * ((a - 1.0 / len(a)) ** 2).sum())
