"""Divergences and shared helpers: references from torch.nn.functional and the published formulas."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mckd.criteria import common, divergences as dv

NAMES = dv.known_divergences()


def _logits(*shape, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ------------------------------------------------------------------ spec-formula oracles (loops)
def _oracle(name, zs, zt, tau=1.0, tau_t=1.0, alpha=0.5, lam=0.1):
    """Per-token value straight from the divergence's formula, one position at a time, float64."""
    out = torch.zeros(zs.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*map(range, zs.shape[:-1])):
        p = torch.softmax(zs[idx].double() / tau, -1)
        q = torch.softmax(zt[idx].double() / (tau * tau_t), -1)
        fkl = (q * (q.log() - p.log())).sum()
        rkl = (p * (p.log() - q.log())).sum()
        if name == "forward_kl":
            v = fkl
        elif name == "reverse_kl":
            v = rkl
        elif name == "js_divergence":
            m = (p + q) / 2
            v = 0.5 * (q * (q.log() - m.log())).sum() + 0.5 * (p * (p.log() - m.log())).sum()
        elif name == "skewed_forward_kl":
            m = lam * q + (1 - lam) * p
            v = (q * (q.log() - m.log())).sum()
        elif name == "skewed_reverse_kl":
            m = (1 - lam) * q + lam * p
            v = (p * (p.log() - m.log())).sum()
        elif name == "tvd":
            v = 0.5 * (p - q).abs().sum()
        elif name == "adaptive_kl":  # the published full ascending sort
            qs, order = q.sort()
            ps = p[order]
            tail = qs.cumsum(0) <= alpha
            gap = (qs - ps).abs()
            gh, gt = (gap * ~tail).sum(), (gap * tail).sum()
            v = gh / (gh + gt) * fkl + gt / (gh + gt) * rkl
        out[idx] = v
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau,tau_t", [(1.0, 1.0), (2.0, 1.5)])
def test_matches_spec_oracle(name, tau, tau_t):
    zs, zt = _logits(2, 3, 40, seed=1), _logits(2, 3, 40, seed=2)
    fn = dv.get_divergence(name, adaptive_kl_alpha=0.5, skew_lambda=0.1)
    got = fn(zs, zt, temperature=tau, teacher_temperature=tau_t)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _oracle(name, zs, zt, tau, tau_t), atol=1e-5, rtol=1e-4)


def test_forward_and_reverse_kl_match_f_kl_div():
    zs, zt = _logits(3, 5, 30, seed=3), _logits(3, 5, 30, seed=4)
    ref_f = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="none").sum(-1)
    ref_r = F.kl_div(F.log_softmax(zt, -1), F.log_softmax(zs, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(dv.forward_kl(zs, zt), ref_f)
    torch.testing.assert_close(dv.reverse_kl(zs, zt), ref_r)


@pytest.mark.parametrize("name", NAMES)
def test_zero_on_identical_inputs(name):
    z = _logits(2, 4, 50, seed=5)
    got = dv.get_divergence(name)(z, z.clone())
    torch.testing.assert_close(got, torch.zeros(2, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_tau_squared_scaling(name):
    zs, zt = _logits(2, 3, 20, seed=6), _logits(2, 3, 20, seed=7)
    fn = dv.get_divergence(name)
    plain = fn(zs, zt, temperature=2.0)
    torch.testing.assert_close(fn(zs, zt, temperature=2.0, tau_squared=True), 4.0 * plain)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_are_computed_in_fp32(name):
    zs, zt = _logits(2, 3, 64, seed=8, dtype=torch.bfloat16), _logits(2, 3, 64, seed=9, dtype=torch.bfloat16)
    fn = dv.get_divergence(name)
    got = fn(zs, zt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(zs.float(), zt.float()))


@pytest.mark.parametrize("name", NAMES)
def test_infinite_logits_contribute_zero(name):
    """-inf entries (e.g. a masked vocabulary slot) give finite values and gradients."""
    zs, zt = _logits(1, 2, 10, seed=10), _logits(1, 2, 10, seed=11)
    zs_inf, zt_inf = zs.clone(), zt.clone()
    zs_inf[..., 3] = -math.inf
    zt_inf[..., 3] = -math.inf
    zs_inf.requires_grad_(True)
    val = dv.get_divergence(name)(zs_inf, zt_inf)
    assert torch.isfinite(val).all()
    val.sum().backward()
    assert torch.isfinite(zs_inf.grad).all()
    # the same as the divergence over the 9 remaining entries
    keep = [i for i in range(10) if i != 3]
    torch.testing.assert_close(val.detach(), dv.get_divergence(name)(zs[..., keep], zt[..., keep]),
                               atol=1e-6, rtol=1e-5)


def test_adaptive_kl_topk_and_fallback_agree_with_sort():
    """Peaked rows use the top-K path, flat rows the sort fallback; both equal the oracle."""
    V = 300
    zs = _logits(2, 6, V, seed=12)
    zt = _logits(2, 6, V, seed=13, scale=0.2)          # flat teacher: head longer than K
    zt[0, :3] = _logits(3, V, seed=14, scale=8.0)      # peaked teacher rows: head inside top-K
    p, q = torch.softmax(zs, -1), torch.softmax(zt, -1)
    qk = q.topk(dv.AKL_TOP_K, -1).values.sum(-1)
    covered = qk >= q.sum(-1) - 0.5
    assert covered.any() and (~covered).any()          # both paths exercised
    got = dv.adaptive_kl(zs, zt, alpha=0.5)
    torch.testing.assert_close(got.double(), _oracle("adaptive_kl", zs, zt, alpha=0.5), atol=1e-5, rtol=1e-4)
    gh, gt = dv.adaptive_kl_weights(p, q, 0.5, top_k=V)  # pure sort path
    gh2, gt2 = dv.adaptive_kl_weights(p, q, 0.5)
    torch.testing.assert_close(gh, gh2)
    torch.testing.assert_close(gt, gt2)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "adaptive_kl"])
def test_gradcheck_float64(name):
    zs = _logits(1, 2, 7, seed=15).double().requires_grad_(True)
    zt = _logits(1, 2, 7, seed=16).double()
    fn = dv.get_divergence(name)
    assert torch.autograd.gradcheck(lambda x: fn(x, zt, temperature=1.5), (zs,), eps=1e-6, atol=1e-5)


def test_adaptive_kl_weights_all_three_tiers_match_full_sort():
    """top-K, the 16K retry and the full sort, mixed in one call (K = 2: tiers at 2, 32, V)."""
    V = 200
    q_logits = torch.cat([_logits(2, V, seed=21, scale=8.0),     # peaked: head within 2
                          _logits(2, V, seed=22, scale=2.5),     # medium
                          _logits(2, V, seed=23, scale=0.1)])    # flat: head > 32
    p, q = torch.softmax(_logits(6, V, seed=24), -1), torch.softmax(q_logits, -1)
    qs = q.sort(-1, descending=True).values
    head = ((qs.cumsum(-1) - qs) < q.sum(-1, keepdim=True) - 0.5).sum(-1)
    assert (head <= 2).any() and ((head > 2) & (head <= 32)).any() and (head > 32).any()
    got = dv.adaptive_kl_weights(p, q, 0.5, top_k=2)
    ref = dv.adaptive_kl_weights(p, q, 0.5, top_k=V)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_adaptive_kl_gradient_treats_weights_as_constants():
    zs = _logits(1, 3, 9, seed=19).double().requires_grad_(True)
    zt = _logits(1, 3, 9, seed=20).double()
    gh, gt = dv.adaptive_kl_weights(torch.softmax(zs, -1).detach(), torch.softmax(zt, -1), 0.5)
    w_h, w_t = gh / (gh + gt), gt / (gh + gt)
    fn = lambda x: w_h * dv.forward_kl(x, zt) + w_t * dv.reverse_kl(x, zt)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-5)
    g_ref, = torch.autograd.grad(fn(zs).sum(), zs)
    g, = torch.autograd.grad(dv.adaptive_kl(zs, zt).sum(), zs)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-6, rtol=1e-5)


def test_get_divergence_unknown_name_suggests():
    with pytest.raises(KeyError, match="Did you mean 'forward_kl'"):
        dv.get_divergence("forward_kll")


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same vocabulary"):
        dv.forward_kl(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))


# ------------------------------------------------------------------ common helpers
def test_cross_entropy_sum_matches_f_cross_entropy_with_smoothing():
    logits = _logits(2, 5, 11, seed=17)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    for eps in (0.0, 0.1):
        loss, nll = common.cross_entropy_sum(logits, labels, eps)
        ref = F.cross_entropy(logits.view(-1, 11), labels.view(-1), reduction="sum", label_smoothing=eps)
        ref_nll = F.cross_entropy(logits.view(-1, 11), labels.view(-1), reduction="sum")
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(nll, ref_nll)


def test_cross_entropy_all_masked_is_finite_zero_with_grad():
    logits = _logits(2, 3, 7, seed=18).requires_grad_(True)
    labels = torch.full((2, 3), -100)
    loss, _ = common.cross_entropy_sum(logits, labels, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_masked_sum_ignores_nan_at_masked_positions():
    v = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]], requires_grad=True)
    m = torch.tensor([[True, False], [True, False]])
    s = common.masked_sum(v, m)
    s.backward()
    assert s.item() == 3.0 and torch.isfinite(v.grad).all()


def test_token_accuracy_and_combine():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 5.0]]])
    labels = torch.tensor([[1, 1, -100]])
    assert common.token_accuracy(logits, labels).item() == 1
    ce, kd = torch.tensor(2.0), torch.tensor(4.0)
    assert common.combine_losses(ce, kd, 0.25, "published", "interpolate").item() == 0.75 * 2 + 0.25 * 4
    assert common.combine_losses(ce, kd, 0.25, "additive", "interpolate").item() == 2 + 0.25 * 4
    assert common.combine_losses(ce, kd, 0.25, "published", "additive").item() == 2 + 0.25 * 4
    with pytest.raises(ValueError, match="--loss-combination"):
        common.combine_losses(ce, kd, 0.25, "sum", "additive")
