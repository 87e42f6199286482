"""Direct KL on exactly aligned positions, in the student vocabulary (MCW-KD's ``--mcw-exact-kl-weight``).

Where the two tokenizations cut the text identically (``batch["exact_teacher_index"]``,
:mod:`mckd.data.alignment`) the teacher's next-token distribution can be read in the student's own
vocabulary through the shared-string map (:mod:`mckd.data.shared_vocab`): the teacher's
probabilities on the ``K`` shared token strings, renormalised, become a target on the matching
student ids::

    w = softmax(z_t[j, T] / tau)                       (K,) on student ids S
    KL(w || p_s[i]) = sum_k w_k (log w_k - log softmax(z_s[i] / tau)[S_k])

summed over the exactly aligned label pairs ``(i, j)``.
"""
from __future__ import annotations

import torch

from mckd.criteria.common import upcast
from mckd.criteria.dual_space_kd_v2 import exact_pairs


def exact_vocab_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   teacher_labels: torch.Tensor, exact_index: torch.Tensor, shared_s: torch.Tensor,
                   shared_t: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the direct KL over exactly aligned label pairs.

    Args:
        student_logits: (B, T_s, V_s); teacher_logits: (B, T_t, V_t).
        labels: (B, T_s); teacher_labels: (B, T_t).
        exact_index: (B, T_s) long, teacher position or -1.
        shared_s, shared_t: (K,) long student / teacher ids of the shared strings.
        temperature: tau of both sides.

    Returns:
        ``(kl_sum, n_pairs)``: 0-dim tensors (the sum is differentiable in the student logits).
    """
    rows_s, rows_t = exact_pairs(exact_index, labels, teacher_labels)
    zs = upcast(student_logits).reshape(-1, student_logits.shape[-1]).index_select(0, rows_s)
    with torch.no_grad():
        zt = upcast(teacher_logits.detach()).reshape(-1, teacher_logits.shape[-1]).index_select(0, rows_t)
        lw = torch.log_softmax(zt.index_select(1, shared_t) / temperature, dim=-1)        # (n, K)
    lp = torch.log_softmax(zs / temperature, dim=-1).index_select(1, shared_s)            # (n, K)
    kl = (lw.exp() * (lw - lp)).sum()
    return kl, torch.tensor(rows_s.numel(), device=kl.device)
