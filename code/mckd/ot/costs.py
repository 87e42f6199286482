"""Batched cost matrices between teacher positions (rows, ``M``) and student positions (columns, ``N``).

Every function works on padded batches and returns (B, M, N); masks decide later which entries take
part in the transport (see :mod:`mckd.ot.sinkhorn`). Nothing here loops over the batch or positions
and nothing materialises an (M, N, K) tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``C_ij = ||x_i - y_j||_2``.

    Args:
        x: (B, M, D); y: (B, N, D).

    Returns:
        (B, M, N) in the promoted float dtype of the inputs (fp32 at least).
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    # ||x||^2 + ||y||^2 - 2 x.y as one GEMM; the square root is guarded so that coincident points
    # (distance 0) get a zero gradient instead of inf/NaN.
    d2 = (x.square().sum(-1)[:, :, None] + y.square().sum(-1)[:, None, :]
          - 2.0 * torch.bmm(x, y.transpose(1, 2))).clamp_min(0)
    pos = d2 > torch.finfo(dtype).tiny
    return torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), torch.zeros_like(d2))


def pairwise_kl(p: torch.Tensor, q: torch.Tensor, *, q_floor: float = 1e-7) -> torch.Tensor:
    """``C_ij = KL(p_i || q_j) = sum_k p_ik log p_ik - p_ik log(q_jk + q_floor)`` with one GEMM.

    Args:
        p: (B, M, K) probability rows (teacher side).
        q: (B, N, K) probability rows (student side).
        q_floor: added inside the log of ``q`` (the published 1e-7).

    Returns:
        (B, M, N) KL costs (fp32 at least). ``0 log 0 = 0``.
    """
    dtype = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
    p, q = p.to(dtype), q.to(dtype)
    neg_entropy = torch.special.xlogy(p, p).sum(-1)                               # (B, M)
    cross = torch.bmm(p, torch.log(q + q_floor).transpose(1, 2))                  # (B, M, N)
    return neg_entropy[:, :, None] - cross


def salience_cost(teacher_salience: torch.Tensor, student_salience: torch.Tensor) -> torch.Tensor:
    """``C_ij = |s_t,i - s_s,j|`` between scalar salience scores.

    Args:
        teacher_salience: (B, M); student_salience: (B, N).

    Returns:
        (B, M, N).
    """
    dtype = torch.promote_types(torch.promote_types(teacher_salience.dtype, student_salience.dtype), torch.float32)
    return (teacher_salience.to(dtype)[:, :, None] - student_salience.to(dtype)[:, None, :]).abs()


def context_mean(x: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of ``x`` over a centred window of ``2 * window + 1`` valid positions, clipped at the
    edges of the valid block, by pooling (no position loop).

    For a contiguous valid block (right padding, or the response span) this is exactly the
    published ``ctx(X)_i = mean(X[max(i - w, 0) : min(i + w, n - 1) + 1])`` over the gathered rows.

    Args:
        x: (B, T, D) features.
        mask: (B, T) bool, True on valid positions.
        window: half width ``w``.

    Returns:
        (B, T, D) context means (0 on invalid positions).
    """
    m = mask.to(x.dtype)[:, :, None]                                              # (B, T, 1)
    if window <= 0:
        return x * m
    # Prefix sums over time give every window sum in O(T) without an unfold of size k.
    xs = F.pad((x * m).cumsum(1), (0, 0, 1, 0))                                   # (B, T+1, D)
    ms = F.pad(m.cumsum(1), (0, 0, 1, 0))                                         # (B, T+1, 1)
    T = x.shape[1]
    idx = torch.arange(T, device=x.device)
    hi = (idx + window + 1).clamp_max(T)
    lo = (idx - window).clamp_min(0)
    win_sum = xs[:, hi] - xs[:, lo]                                               # (B, T, D)
    win_cnt = ms[:, hi] - ms[:, lo]                                               # (B, T, 1)
    return win_sum / win_cnt.clamp_min(1) * m


def pairwise_cosine_distance(x: torch.Tensor, y: torch.Tensor, *, norm_eps: float = 1e-7) -> torch.Tensor:
    """``C_ij = 1 - <x_i, y_j> / ((||x_i|| + e)(||y_j|| + e))`` (the published form, e = 1e-7).

    Args:
        x: (B, M, D); y: (B, N, D).

    Returns:
        (B, M, N).
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    xn = x / (x.norm(dim=-1, keepdim=True) + norm_eps)
    yn = y / (y.norm(dim=-1, keepdim=True) + norm_eps)
    return 1.0 - torch.bmm(xn, yn.transpose(1, 2))


def masked_max(cost: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor) -> torch.Tensor:
    """(B,) maximum of each example's valid entries (0 for an empty example)."""
    valid = row_mask.bool()[:, :, None] & col_mask.bool()[:, None, :]
    return cost.masked_fill(~valid, float("-inf")).flatten(1).max(1).values.clamp_min(0)


def masked_mean(cost: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of each example's valid entries (0 for an empty example)."""
    valid = (row_mask.bool()[:, :, None] & col_mask.bool()[:, None, :]).to(cost.dtype)
    return (cost * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)


def alignment_cost_from_pairs(index: torch.Tensor, value: torch.Tensor, pair_mask: torch.Tensor,
                              teacher_len: int, student_len: int) -> torch.Tensor:
    """Dense (B, T_t, T_s) cost from sparse (teacher_pos, student_pos, value) triples.

    The data pipeline's ``dtw_index`` / ``dtw_value`` / ``dtw_mask`` scatter-added into zeros give the
    published edit-distance DTW cost ``(C_s2t^T + C_t2s) / 2`` (zero off the warping path).

    Args:
        index: (B, P, 2) long, ``[teacher_pos, student_pos]``.
        value: (B, P) float.
        pair_mask: (B, P) bool, False on padding pairs.
        teacher_len: T_t; student_len: T_s.

    Returns:
        (B, T_t, T_s) float32.
    """
    B = index.shape[0]
    flat = (index[..., 0].clamp(0, teacher_len - 1) * student_len
            + index[..., 1].clamp(0, student_len - 1))                            # (B, P)
    vals = value.float() * pair_mask.float()
    out = torch.zeros(B, teacher_len * student_len, dtype=torch.float32, device=value.device)
    out.scatter_add_(1, flat, vals)
    return out.view(B, teacher_len, student_len)


def span_iou_cost(teacher_offsets: torch.Tensor, student_offsets: torch.Tensor) -> torch.Tensor:
    """``C_ij = 1 - IoU`` of the character spans of teacher token i and student token j.

    Tokens of the same text that cover the same characters cost 0, disjoint tokens cost 1. Empty
    spans (padding, special tokens) cost 1 to everything.

    Args:
        teacher_offsets: (B, T_t, 2) long ``[start, end)``; student_offsets: (B, T_s, 2).

    Returns:
        (B, T_t, T_s) float32.
    """
    ts, te = teacher_offsets[..., 0].float()[:, :, None], teacher_offsets[..., 1].float()[:, :, None]
    ss, se = student_offsets[..., 0].float()[:, None, :], student_offsets[..., 1].float()[:, None, :]
    inter = (torch.minimum(te, se) - torch.maximum(ts, ss)).clamp_min(0)
    union = (te - ts).clamp_min(0) + (se - ss).clamp_min(0) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-9), torch.zeros_like(inter))
    return 1.0 - iou
