"""Batched Soft-DTW (Cuturi & Blondel, ICML 2017) and the Soft-DTW divergence.

For a cost matrix ``C`` (M, N) and ``gamma > 0``::

    R[0, 0] = 0,  R[i, 0] = R[0, j] = +inf (i, j > 0)
    R[i, j] = C[i-1, j-1] + softmin_gamma(R[i-1, j-1], R[i-1, j], R[i, j-1])
    softmin_gamma(a) = -gamma log sum_k exp(-a_k / gamma)
    SDTW(C) = R[M, N]

The divergence (Blondel, Mensch & Vert, AISTATS 2021) removes the entropic bias so that it is 0 for
identical sequences: ``D(x, y) = SDTW(C_xy) - (SDTW(C_xx) + SDTW(C_yy)) / 2``.

:func:`soft_dtw` solves a padded batch (B, M, N) with per-example lengths along the anti-diagonals
``i + j = k``: every cell of one anti-diagonal depends only on the two previous ones, so each of the
``M + N - 1`` steps updates all cells of a diagonal for the whole batch at once (no loop over cells
or examples). Cells beyond an example's lengths never influence ``R[m_b, n_b]`` (the recursion only
looks up and left), so padding cannot change a value; their costs are replaced by 0 and the border
by a large finite constant so that no inf or NaN reaches the gradient, which comes from autograd.
"""
from __future__ import annotations

import torch

_BIG = 1e10  # stands for +inf on the borders (finite: softmin gradients stay defined)


def soft_dtw(cost: torch.Tensor, len_rows: torch.Tensor, len_cols: torch.Tensor, gamma: float) -> torch.Tensor:
    """Soft-DTW values of a batch of cost matrices.

    Args:
        cost: (B, M, N) pairwise costs (any float dtype; fp32 at least inside).
        len_rows: (B,) long, valid rows ``m_b <= M`` of each example.
        len_cols: (B,) long, valid columns ``n_b <= N``.
        gamma: smoothing, > 0.

    Returns:
        (B,) ``R[m_b, n_b]``; 0 for an example with no row or no column.
    """
    if gamma <= 0:
        raise ValueError(f"soft_dtw: gamma must be > 0, got {gamma}")
    if cost.dim() != 3:
        raise ValueError(f"soft_dtw: cost must be (B, M, N), got {tuple(cost.shape)}")
    B, M, N = cost.shape
    dtype = torch.promote_types(cost.dtype, torch.float32)
    dev = cost.device
    if M == 0 or N == 0:
        return cost.new_zeros(B, dtype=dtype)
    rows = torch.arange(M, device=dev)
    valid_cell = (rows[None, :, None] < len_rows[:, None, None]) & \
                 (torch.arange(N, device=dev)[None, None, :] < len_cols[:, None, None])
    c = torch.where(valid_cell, cost.to(dtype), torch.zeros((), dtype=dtype, device=dev))
    # anti-diagonals of C in R coordinates: step k (2..M+N) holds cells (i, k - i), i = 1..M
    ks = torch.arange(2, M + N + 1, device=dev)                                       # (K,)
    jj = ks[:, None] - rows[None, :] - 2                                              # (K, M) 0-based col
    on_grid = (jj >= 0) & (jj < N)
    cdiag = c[:, rows[None, :].expand_as(jj), jj.clamp(0, N - 1)]                     # (B, K, M)
    big = torch.full((B, 1), _BIG, dtype=dtype, device=dev)
    d_prev2 = torch.cat([torch.zeros(B, 1, dtype=dtype, device=dev), big.expand(B, M)], dim=1)  # k = 0
    d_prev1 = big.expand(B, M + 1)                                                    # k = 1
    diags = [d_prev2, d_prev1]
    for step in range(ks.numel()):
        diag = d_prev2[:, :-1]                                                        # R[i-1, j-1]
        up = d_prev1[:, :-1]                                                          # R[i-1, j]
        left = d_prev1[:, 1:]                                                         # R[i, j-1]
        soft = -gamma * torch.logsumexp(torch.stack([diag, up, left], dim=0) / -gamma, dim=0)  # (B, M)
        new = torch.where(on_grid[step], cdiag[:, step] + soft, big)
        d_cur = torch.cat([big, new], dim=1)                                          # (B, M + 1)
        diags.append(d_cur)
        d_prev2, d_prev1 = d_prev1, d_cur
    R = torch.stack(diags, dim=1)                                                     # (B, M+N+1, M+1)
    k_end = (len_rows + len_cols).clamp(0, M + N)
    out = R[torch.arange(B, device=dev), k_end, len_rows.clamp(0, M)]
    empty = (len_rows == 0) | (len_cols == 0)
    return torch.where(empty, torch.zeros((), dtype=dtype, device=dev), out)


def soft_dtw_divergence(x: torch.Tensor, y: torch.Tensor, len_x: torch.Tensor, len_y: torch.Tensor,
                        gamma: float, cost_fn) -> torch.Tensor:
    """``SDTW(C_xy) - (SDTW(C_xx) + SDTW(C_yy)) / 2`` per example.

    Args:
        x: (B, M, D); y: (B, N, D) sequences, valid prefixes of lengths ``len_x``/``len_y``.
        gamma: Soft-DTW smoothing.
        cost_fn: ``(a (B, P, D), b (B, Q, D)) -> (B, P, Q)`` pairwise cost.

    Returns:
        (B,).
    """
    return (soft_dtw(cost_fn(x, y), len_x, len_y, gamma)
            - 0.5 * (soft_dtw(cost_fn(x, x), len_x, len_x, gamma) + soft_dtw(cost_fn(y, y), len_y, len_y, gamma)))
