"""Helpers every criterion shares: the label mask, the token-sum reduction, CE and accuracy.

Conventions (see :mod:`mckd.criteria.base`):

* ``labels == -100`` is the only label mask (:data:`mckd.data.batch.IGNORE_INDEX`).
* Losses are *token sums*; the loop divides by the global label-token count.
* Nothing here calls ``.item()`` or branches on tensor values (no host synchronisation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mckd.data.batch import IGNORE_INDEX

LOSS_COMBINATIONS = ("published", "interpolate", "additive")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (fp16/bf16 become fp32; fp32 and fp64 are kept)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of supervised positions.

    Args:
        labels: (B, T) long, ``-100`` where nothing is predicted.

    Returns:
        (B, T) bool, True where ``labels != -100``.
    """
    return labels.ne(IGNORE_INDEX)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over positions where ``mask`` is True, as a 0-dim tensor.

    Masked-out entries are *replaced* (not multiplied) by zero, so a NaN or inf computed at a
    padding position can neither leak into the value nor into the gradient.

    Args:
        values: (B, T) per-position values (any float dtype; summed in fp32).
        mask: (B, T) bool (or 0/1) mask, broadcastable to ``values``.
    """
    mask = mask.bool()
    v = upcast(values)
    return torch.where(mask, v, v.new_zeros(())).sum()


def count_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of supervised positions (0-dim long tensor)."""
    return label_mask(labels).sum()


def safe_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels with ``-100`` replaced by 0 so they can index a vocabulary (mask separately)."""
    return labels.masked_fill(labels.eq(IGNORE_INDEX), 0)


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"{where}: expected logits (B, T, V) and labels (B, T), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 log-probability of each label (0 where the label is ``-100``).

    Args:
        logits: (B, T, V).
        labels: (B, T) long.

    Returns:
        (B, T) fp32.
    """
    _check_logits_labels(logits, labels, "token_log_probs")
    logp = torch.log_softmax(upcast(logits), dim=-1)
    tok = logp.gather(-1, safe_targets(labels).unsqueeze(-1)).squeeze(-1)
    return torch.where(label_mask(labels), tok, torch.zeros_like(tok))


def label_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a position mask (one host synchronisation).

    Vocabulary-sized work (head projections, log-softmaxes, divergences) is done on these rows
    only instead of on every position and then masked; on Dolly-like batches about half of the
    positions are labels, so this halves that work (BENCHMARKS.md).

    Args:
        mask: (B, T) bool.

    Returns:
        (n,) long indices into the flattened (B * T) positions.
    """
    return mask.reshape(-1).nonzero().squeeze(-1)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` at flat positions ``rows`` (differentiable; backward scatters into zeros).

    Args:
        x: (B, T, ...) tensor.
        rows: (n,) long indices from :func:`label_rows`.

    Returns:
        (n, ...).
    """
    return x.reshape(-1, *x.shape[2:]).index_select(0, rows)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor,
                       label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-summed cross-entropy over rows that are all supervised (see :func:`cross_entropy_sum`).

    Args:
        logits: (n, V) any float dtype (upcast to fp32).
        targets: (n,) long, valid vocabulary ids.
        label_smoothing: eps in [0, 1).

    Returns:
        ``(loss_sum, nll_sum)`` 0-dim fp32 tensors.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy_sum: label_smoothing must be in [0, 1), got {label_smoothing}")
    logp = torch.log_softmax(upcast(logits), dim=-1)                      # (n, V)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)             # (n,)
    nll_sum = nll.sum()
    if label_smoothing == 0.0:
        return nll_sum, nll_sum
    smooth = -logp.mean(dim=-1)                                           # (n,)
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).sum(), nll_sum


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-summed cross-entropy in fp32, with correct label smoothing.

    With smoothing ``eps`` the per-token loss is ``(1 - eps) * nll + eps * mean_v(-log p_v)``
    (the same definition as :func:`torch.nn.functional.cross_entropy`). The published code
    multiplied the NLL part by the number of tokens; this does not. The log-softmax is
    computed on the label rows only (:func:`label_rows`).

    Args:
        logits: (B, T, V) any float dtype (upcast to fp32).
        labels: (B, T) long, ``-100`` = ignored.
        label_smoothing: eps in [0, 1).

    Returns:
        ``(loss_sum, nll_sum)``: 0-dim fp32 tensors; ``loss_sum == nll_sum`` when eps is 0.
    """
    _check_logits_labels(logits, labels, "cross_entropy_sum")
    rows = label_rows(label_mask(labels))
    return cross_entropy_rows(gather_rows(logits, rows), gather_rows(labels, rows), label_smoothing)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of supervised positions whose argmax equals the label (0-dim long tensor)."""
    _check_logits_labels(logits, labels, "token_accuracy")
    return (logits.argmax(dim=-1).eq(labels) & label_mask(labels)).sum()


def combine_losses(ce: torch.Tensor, kd: torch.Tensor, kd_rate: float, combination: str,
                   published: str) -> torch.Tensor:
    """Combine the CE and KD token sums.

    Args:
        ce: 0-dim CE token sum.
        kd: 0-dim KD token sum.
        kd_rate: lambda.
        combination: ``"interpolate"`` -> ``(1 - l) * CE + l * KD``; ``"additive"`` ->
            ``CE + l * KD``; ``"published"`` -> whichever of the two ``published`` names.
        published: what the criterion's published code used (``"interpolate"``/``"additive"``).
    """
    if combination not in LOSS_COMBINATIONS:
        raise ValueError(f"--loss-combination: unknown value {combination!r}; "
                         f"choose one of {', '.join(LOSS_COMBINATIONS)}")
    mode = published if combination == "published" else combination
    if mode == "interpolate":
        return (1.0 - kd_rate) * ce + kd_rate * kd
    if mode == "additive":
        return ce + kd_rate * kd
    raise ValueError(f"combine_losses: published combination must be 'interpolate' or "
                     f"'additive', got {published!r}")


def teacher_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's labels: ``batch["teacher_labels"]``, or the student's when the teacher
    shares the student's tokenization (no teacher keys in the batch)."""
    return batch.get("teacher_labels", batch["labels"])


def teacher_input_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's input ids (falls back to the student's, as :func:`teacher_labels`)."""
    return batch.get("teacher_input_ids", batch["input_ids"])


def require_hidden(view, who: str, criterion: str) -> torch.Tensor:
    """Return ``view.hidden`` or fail with a message naming the criterion."""
    if view is None:
        raise ValueError(f"{criterion}: needs a teacher, but the loop passed teacher=None")
    if view.hidden is None:
        raise ValueError(f"{criterion}: needs the {who}'s last hidden states (ModelView.hidden is None); "
                         f"the loop must run the {who} with output_hidden_states=True")
    return view.hidden


def head_logits(hidden: torch.Tensor, head_weight: torch.Tensor,
                head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Project hidden states with a *detached* output head (the head is not trained through it).

    Args:
        hidden: (B, T, D).
        head_weight: (V, D).
        head_bias: (V,) or None.

    Returns:
        (B, T, V) in the head's dtype.
    """
    w = head_weight.detach()
    b = None if head_bias is None else head_bias.detach()
    return F.linear(hidden.to(w.dtype), w, b)


def is_on_policy(batch: dict) -> bool:
    """True for a batch whose responses the student sampled (``batch["on_policy"]``, set by
    :mod:`mckd.train.on_policy`): criteria drop their CE term there."""
    flag = batch.get("on_policy")
    return flag is not None and bool(flag)
