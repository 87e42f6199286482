"""MCW-KD cost weights: the closed-form solution of the published QP and its update rule.

The published method re-weights the three costs of each OT family by solving, every
``update_interval`` optimizer steps,

    minimise_alpha  c . alpha + sigma * ||alpha - 1/K||^2   s.t.  sum(alpha) = 1,  alpha >= floor

with cvxpy. By the KKT conditions the solution is ``alpha_i = max(floor, 1/K - (c_i + nu) / (2 sigma))``
with ``nu`` such that the weights sum to 1, i.e. the Euclidean projection of
``z = 1/K - c / (2 sigma)`` onto the floored simplex. :func:`simplex_qp_weights` computes it exactly
with a sort (no solver, no host sync, batched over leading dimensions).

Statistics ``c`` (per family, per cost):

* ``"mean_cost"`` (published): the mean of each cost matrix over the valid pairs. Scale dependent:
  a cost in larger units (the KL) is pushed to the floor whatever the alignment says (14.2.18).
* ``"plan_ratio"`` (our default): ``<P*, C_k> / mean(C_k)``, the transport cost of the current plan
  under cost ``k`` relative to that cost's average pair. It is unit free (1 for a plan that ignores
  the cost, near 0 for a plan that the cost agrees with), so the QP compares costs on a common scale
  and moves weight to the costs the alignment is consistent with.

Update rule (identical on every rank): the criterion sums the per-micro-batch statistics in local
accumulators; every ``update_interval`` optimizer steps the means are averaged over ranks
(``all_reduce_mean``), the QP is solved, and the weights become
``momentum * old + (1 - momentum) * qp`` (``momentum = 0`` is the published memoryless replacement;
a convex combination stays on the floored simplex). The weights are buffers: saved and restored with
the criterion's ``state_dict``.
"""
from __future__ import annotations

import torch

WEIGHT_STATISTICS = ("mean_cost", "plan_ratio")


def project_to_floored_simplex(z: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Euclidean projection of ``z`` onto ``{x : sum(x) = 1, x_i >= floor}`` along the last dim.

    Args:
        z: (..., K) points.
        floor: lower bound of every coordinate; needs ``K * floor <= 1``.

    Returns:
        (..., K) projected weights.
    """
    K = z.shape[-1]
    if K * floor > 1 + 1e-12:
        raise ValueError(f"project_to_floored_simplex: floor {floor} too large for {K} weights (K*floor > 1)")
    mass = 1.0 - K * floor
    y = z - floor
    # Projection onto {x >= 0, sum x = mass}: the classic sort-and-threshold rule.
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = u.cumsum(-1) - mass
    ks = torch.arange(1, K + 1, device=z.device, dtype=z.dtype)
    cond = (u - css / ks) > 0
    rho = cond.to(z.dtype).cumsum(-1).argmax(-1, keepdim=True)                   # last True index
    theta = css.gather(-1, rho) / (rho + 1).to(z.dtype)
    return (y - theta).clamp_min(0) + floor


def simplex_qp_weights(costs: torch.Tensor, *, sigma: float = 2.0, floor: float = 0.01) -> torch.Tensor:
    """Closed-form solution of ``min c.a + sigma ||a - 1/K||^2, sum a = 1, a >= floor``.

    Args:
        costs: (..., K) cost statistics ``c``.
        sigma: proximal weight (published 2.0).
        floor: minimum weight (published 0.01).

    Returns:
        (..., K) weights on the floored simplex.
    """
    if sigma <= 0:
        raise ValueError(f"simplex_qp_weights: sigma must be > 0, got {sigma}")
    K = costs.shape[-1]
    z = 1.0 / K - costs / (2.0 * sigma)
    return project_to_floored_simplex(z, floor)


def check_initial_weights(name: str, weights, n: int = 3) -> tuple[float, ...]:
    """Validate initial cost weights given on the command line (``name`` is the flag)."""
    w = tuple(float(x) for x in weights)
    if len(w) != n:
        raise ValueError(f"{name}: expected {n} weights, got {len(w)}: {w}")
    if any(x < 0 for x in w) or abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(f"{name}: weights must be >= 0 and sum to 1 (simplex), got {w}")
    return w
