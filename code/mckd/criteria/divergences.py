"""Per-token divergences between a student and a teacher distribution over one vocabulary.

Every function takes logits and returns one value per position; masking and reduction are the
caller's (:func:`mckd.criteria.common.masked_sum`). Shared conventions:

* ``p = softmax(z_s / tau)`` is the student, ``q = softmax(z_t / (tau * tau_t))`` the teacher
  (``tau_t`` = ``teacher_temperature``, 1 except in the DSKD-CMA teacher-to-student term).
* log-softmax is computed in fp32 whatever the input dtype.
* Entries of the vocabulary sum where either logit is +-inf contribute 0 (the published code
  zeroed entries with an infinite student logit in FKL and either logit in RKL; for a teacher
  logit of -inf, q = 0 and 0 is also the exact value of ``0 log 0``).
* ``tau_squared=True`` multiplies the value by ``tau**2`` (Hinton et al.), which keeps gradient
  magnitudes independent of tau; off by default, as in the published code.

Shapes: ``student_logits`` (B, T, V), ``teacher_logits`` (B, T, V) -> (B, T) fp32. Any number of
leading dimensions works; the vocabulary is the last.
"""
from __future__ import annotations

import difflib
import functools
import math
from typing import Callable, Protocol

import torch

from mckd.criteria.common import upcast

AKL_TOP_K = 64  # candidate head size for adaptive_kl before falling back to a full sort


class Divergence(Protocol):
    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                 temperature: float = 1.0, teacher_temperature: float = 1.0,
                 tau_squared: bool = False) -> torch.Tensor: ...


def _log_probs_check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                     teacher_temperature: float, name: str) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{name}: student and teacher logits must have the same shape "
                         f"(same vocabulary), got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"{name}: temperatures must be > 0, got temperature={temperature}, "
                         f"teacher_temperature={teacher_temperature}")


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               teacher_temperature: float, name: str):
    """fp32 log-softmax of both sides plus the mask of finite entries."""
    _log_probs_check(student_logits, teacher_logits, temperature, teacher_temperature, name)
    zs = upcast(student_logits) / temperature
    zt = upcast(teacher_logits) / (temperature * teacher_temperature)
    finite = torch.isfinite(zs + zt)  # False where either logit is +-inf (or NaN)
    # Dropped entries get log-prob 0 so that no -inf - -inf (NaN) reaches values or gradients;
    # their terms are then zeroed by ``finite``.
    zero = zs.new_zeros(())
    lp = torch.where(finite, torch.log_softmax(zs, dim=-1), zero)
    lq = torch.where(finite, torch.log_softmax(zt, dim=-1), zero)
    return lp, lq, finite


def _kl_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
              finite: torch.Tensor) -> torch.Tensor:
    """sum_v a * (log a - log b) over the last axis, with non-finite entries set to 0."""
    term = a * (log_a - log_b)
    return torch.where(finite, term, torch.zeros((), dtype=term.dtype, device=term.device)).sum(-1)


def _scale(value: torch.Tensor, temperature: float, tau_squared: bool) -> torch.Tensor:
    return value * (temperature ** 2) if tau_squared else value


class _ForwardKLConstantTeacher(torch.autograd.Function):
    """Forward KL with a teacher that receives no gradient, in few passes over the vocabulary.

    Same value as the generic path (entries where either logit is non-finite dropped); the
    gradient is written in closed form, ``d/dz_s = (Q p - q_F) / tau`` with ``q_F`` the teacher
    probabilities on the kept entries and ``Q`` their sum, instead of autograd through the
    log-softmaxes, ``where`` masks and products (about 3x fewer vocabulary-sized passes and
    temporaries, measured in benchmarks/bench_criteria.py).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, teacher_temperature):
        zs = upcast(student_logits)
        zs = zs / temperature if temperature != 1.0 else zs
        tt = temperature * teacher_temperature
        zt = upcast(teacher_logits)
        zt = zt / tt if tt != 1.0 else zt
        # dropped = not isfinite(zs + zt): x - x is NaN exactly for +-inf and NaN, and the two
        # passes cost less than isfinite's four.
        both = zs + zt
        dropped = both.sub_(both).ne(0.0)                                   # (..., V) bool
        del both
        lq = torch.log_softmax(zt, dim=-1)
        lp = torch.log_softmax(zs, dim=-1)
        q = lq.exp()
        term = lq.sub_(lp).mul_(q).masked_fill_(dropped, 0.0)              # q (log q - log p)
        value = term.sum(-1)
        del term, lq
        ctx.save_for_backward(lp.exp_(), q.masked_fill_(dropped, 0.0))     # p, q_F
        ctx.temperature, ctx.dtype = temperature, student_logits.dtype
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        p, q_f = ctx.saved_tensors
        g = (grad_value / ctx.temperature).unsqueeze(-1)                    # (..., 1)
        grad = (p * q_f.sum(-1, keepdim=True)).sub_(q_f).mul_(g)           # saved tensors kept intact
        return grad.to(ctx.dtype), None, None, None


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, teacher_temperature=1.0,
               tau_squared=False):
    """KL(q || p) = sum_v q (log q - log p). Returns (B, T).

    When the teacher logits need no gradient (every KD criterion detaches its target) the value
    and gradient come from a fused closed-form path; otherwise from autograd.
    """
    if not teacher_logits.requires_grad:
        _log_probs_check(student_logits, teacher_logits, temperature, teacher_temperature, "forward_kl")
        value = _ForwardKLConstantTeacher.apply(student_logits, teacher_logits, float(temperature),
                                                float(teacher_temperature))
        return _scale(value, temperature, tau_squared)
    lp, lq, fin = _log_probs(student_logits, teacher_logits, temperature, teacher_temperature,
                             "forward_kl")
    return _scale(_kl_terms(lq.exp(), lq, lp, fin), temperature, tau_squared)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, teacher_temperature=1.0,
               tau_squared=False):
    """KL(p || q) = sum_v p (log p - log q). Returns (B, T)."""
    lp, lq, fin = _log_probs(student_logits, teacher_logits, temperature, teacher_temperature,
                             "reverse_kl")
    return _scale(_kl_terms(lp.exp(), lp, lq, fin), temperature, tau_squared)


def js_divergence(student_logits, teacher_logits, *, temperature=1.0, teacher_temperature=1.0,
                  tau_squared=False):
    """Jensen-Shannon: 0.5 KL(q || m) + 0.5 KL(p || m), m = (p + q) / 2. Returns (B, T).

    ``log m`` is computed exactly as ``logaddexp(log p, log q) - log 2`` (the published code
    used ``log(x + 1e-9)``; the difference is below 1e-9 per vocabulary entry).
    """
    lp, lq, fin = _log_probs(student_logits, teacher_logits, temperature, teacher_temperature,
                             "js_divergence")
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    value = 0.5 * _kl_terms(lq.exp(), lq, lm, fin) + 0.5 * _kl_terms(lp.exp(), lp, lm, fin)
    return _scale(value, temperature, tau_squared)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b) computed stably from log a and log b."""
    if not 0.0 <= weight_a <= 1.0:
        raise ValueError(f"skew lambda must be in [0, 1], got {weight_a}")
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def skewed_forward_kl(student_logits, teacher_logits, *, skew_lambda=0.1, temperature=1.0,
                      teacher_temperature=1.0, tau_squared=False):
    """KL(q || l q + (1 - l) p), l = ``skew_lambda``. Returns (B, T)."""
    lp, lq, fin = _log_probs(student_logits, teacher_logits, temperature, teacher_temperature,
                             "skewed_forward_kl")
    lm = _log_mix(lq, lp, skew_lambda)
    return _scale(_kl_terms(lq.exp(), lq, lm, fin), temperature, tau_squared)


def skewed_reverse_kl(student_logits, teacher_logits, *, skew_lambda=0.1, temperature=1.0,
                      teacher_temperature=1.0, tau_squared=False):
    """KL(p || (1 - l) q + l p), l = ``skew_lambda``. Returns (B, T)."""
    lp, lq, fin = _log_probs(student_logits, teacher_logits, temperature, teacher_temperature,
                             "skewed_reverse_kl")
    lm = _log_mix(lp, lq, skew_lambda)
    return _scale(_kl_terms(lp.exp(), lp, lm, fin), temperature, tau_squared)


def tvd(student_logits, teacher_logits, *, temperature=1.0, teacher_temperature=1.0,
        tau_squared=False):
    """Total variation distance 0.5 * sum_v |p - q| (not in the published code). Returns (B, T)."""
    lp, lq, fin = _log_probs(student_logits, teacher_logits, temperature, teacher_temperature,
                             "tvd")
    diff = (lp.exp() - lq.exp()).abs()
    value = 0.5 * torch.where(fin, diff, diff.new_zeros(())).sum(-1)
    return _scale(value, temperature, tau_squared)


@torch.no_grad()
def adaptive_kl_weights(p: torch.Tensor, q: torch.Tensor, alpha: float,
                        top_k: int = AKL_TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Head/tail gaps of Adaptive KL (Wu et al. 2024), without sorting the whole vocabulary.

    Published definition: sort q ascending, ``c`` = cumulative sum, tail = {c <= alpha}, head =
    the rest; ``g_head = sum_head |q - p|`` and ``g_tail = sum_tail |q - p|``. Seen from the top,
    an entry with exclusive descending cumsum ``S`` has ``c = sum(q) - S``, so the head is exactly
    the largest entries with ``S < sum(q) - alpha``: a prefix of the descending order. We take
    ``topk(q, K)``; when the top-K mass reaches ``sum(q) - alpha`` (the K+1-th entry is already
    tail) the head is inside it and ``g_tail = sum_v |q - p| - g_head``. Rows whose head is longer
    than K (a flat teacher) are retried with 16 K (1024), and only rows whose head is longer
    still are fully sorted (one host synchronisation per call when any row is uncovered).
    Ties in q are ordered arbitrarily, as by ``torch.sort`` in the published code.

    Args:
        p: (..., V) student probabilities (0 on dropped entries).
        q: (..., V) teacher probabilities (0 on dropped entries).
        alpha: tail mass threshold.
        top_k: K.

    Returns:
        ``(g_head, g_tail)``, each (...).
    """
    V = q.shape[-1]
    gap = (q - p).abs()
    g_total = gap.sum(-1)
    total = q.sum(-1, keepdim=True)
    k = min(V, top_k)
    qk, idx = q.topk(k, dim=-1)                                  # (..., K) descending
    excl = qk.cumsum(-1) - qk
    g_head = (gap.gather(-1, idx) * (excl < (total - alpha))).sum(-1)
    covered = (qk.sum(-1, keepdim=True) >= total - alpha).squeeze(-1) | (k == V)
    if not bool(covered.all()):
        # rare with trained teachers: retry the uncovered rows with a larger K, then a full sort
        rows = ~covered
        q_r, gap_r, tot_r = q[rows], gap[rows], total[rows]
        k2 = min(V, 16 * top_k)
        qs, order = q_r.topk(k2, dim=-1) if k2 < V else q_r.sort(dim=-1, descending=True)
        ok = (qs.sum(-1, keepdim=True) >= tot_r - alpha).squeeze(-1) | (k2 == V)
        if not bool(ok.all()):
            qs2, order2 = q_r[~ok].sort(dim=-1, descending=True)
            head2 = (qs2.cumsum(-1) - qs2) < (tot_r[~ok] - alpha)
            g2 = (gap_r[~ok].gather(-1, order2) * head2).sum(-1)
        head = (qs.cumsum(-1) - qs) < (tot_r - alpha)
        g_r = (gap_r.gather(-1, order) * head).sum(-1)
        if not bool(ok.all()):
            g_r[~ok] = g2
        g_head = g_head.clone()
        g_head[rows] = g_r
    return g_head, g_total - g_head


def adaptive_kl(student_logits, teacher_logits, *, alpha=0.5, temperature=1.0,
                teacher_temperature=1.0, tau_squared=False):
    """Adaptive KL: ``(g_head FKL + g_tail RKL) / (g_head + g_tail)`` per token, the weights
    detached (see :func:`adaptive_kl_weights`). Returns (B, T)."""
    lp, lq, fin = _log_probs(student_logits, teacher_logits, temperature, teacher_temperature,
                             "adaptive_kl")
    zero = lp.new_zeros(())
    p, q = torch.where(fin, lp.exp(), zero), torch.where(fin, lq.exp(), zero)
    fkl = _kl_terms(q, lq, lp, fin)
    rkl = _kl_terms(p, lp, lq, fin)
    g_head, g_tail = adaptive_kl_weights(p.detach(), q.detach(), alpha)
    denom = g_head + g_tail
    # identical distributions: both gaps are 0, both KLs are 0; avoid 0/0
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    value = (g_head / denom) * fkl + (g_tail / denom) * rkl
    return _scale(value, temperature, tau_squared)


_DIVERGENCES: dict[str, Callable] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js_divergence": js_divergence,
    "skewed_forward_kl": skewed_forward_kl,
    "skewed_reverse_kl": skewed_reverse_kl,
    "adaptive_kl": adaptive_kl,
    "tvd": tvd,
}


def known_divergences() -> list[str]:
    return sorted(_DIVERGENCES)


def get_divergence(name: str, *, adaptive_kl_alpha: float = 0.5,
                   skew_lambda: float = 0.1) -> Divergence:
    """The divergence called ``name`` (``--kd-objective``), its own parameter bound.

    Returns:
        ``f(student_logits, teacher_logits, *, temperature=1.0, teacher_temperature=1.0,
        tau_squared=False) -> (B, T)``.

    Raises:
        KeyError: unknown name, with a did-you-mean suggestion and the known names.
    """
    if name not in _DIVERGENCES:
        close = difflib.get_close_matches(name, known_divergences(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"--kd-objective: unknown divergence {name!r}.{hint} "
                       f"Known: {', '.join(known_divergences())}")
    fn = _DIVERGENCES[name]
    if name == "adaptive_kl":
        return functools.partial(fn, alpha=adaptive_kl_alpha)
    if name.startswith("skewed_"):
        return functools.partial(fn, skew_lambda=skew_lambda)
    return fn
