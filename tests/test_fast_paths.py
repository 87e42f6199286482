"""Fast paths of the performance pass give the same values and gradients as the plain formulations.

* ``forward_kl`` with a constant teacher (closed-form gradient) against the autograd path (taken
  when the teacher requires grad), including dropped (-inf) entries, temperatures and bf16.
* Label-row gathering (:func:`mckd.criteria.common.label_rows`) in the criteria against the same
  formulas on every position then masked.
"""
from __future__ import annotations

import math

import pytest
import torch

from mckd.criteria import divergences as dv


def _logits(*shape, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _fkl_value_and_grad(zs, zt, teacher_grad, **kw):
    zs = zs.clone().requires_grad_(True)
    zt = zt.clone().requires_grad_(teacher_grad)
    val = dv.forward_kl(zs, zt, **kw)
    (val * torch.linspace(0.5, 1.5, val.numel(), dtype=val.dtype).view_as(val)).sum().backward()
    return val.detach(), zs.grad


@pytest.mark.parametrize("tau,tau_t,sq", [(1.0, 1.0, False), (2.0, 1.5, True), (0.7, 1.0, False)])
def test_forward_kl_constant_teacher_matches_autograd_path(tau, tau_t, sq):
    zs, zt = _logits(2, 5, 33, seed=1), _logits(2, 5, 33, seed=2)
    # dropped entries: -inf on either side, and on both
    zs[0, 1, 4] = -math.inf
    zt[0, 2, 7] = -math.inf
    zs[1, 3, 9] = zt[1, 3, 9] = -math.inf
    kw = dict(temperature=tau, teacher_temperature=tau_t, tau_squared=sq)
    v_fast, g_fast = _fkl_value_and_grad(zs, zt, False, **kw)
    v_ref, g_ref = _fkl_value_and_grad(zs, zt, True, **kw)
    assert torch.isfinite(v_fast).all() and torch.isfinite(g_fast).all()
    torch.testing.assert_close(v_fast, v_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-12, rtol=1e-10)
    assert g_fast[0, 1, 4] == 0 and g_fast[1, 3, 9] == 0


def test_forward_kl_constant_teacher_gradcheck_and_bf16():
    zs = _logits(2, 3, 9, seed=3).requires_grad_(True)
    zt = _logits(2, 3, 9, seed=4)
    assert torch.autograd.gradcheck(lambda x: dv.forward_kl(x, zt, temperature=1.3, teacher_temperature=2.0),
                                    (zs,), eps=1e-6, atol=1e-6)
    zs16 = _logits(2, 3, 64, seed=5, dtype=torch.bfloat16).requires_grad_(True)
    zt16 = _logits(2, 3, 64, seed=6, dtype=torch.bfloat16)
    val = dv.forward_kl(zs16, zt16)
    assert val.dtype == torch.float32
    val.sum().backward()
    assert zs16.grad.dtype == torch.bfloat16
    ref = zs16.detach().float().requires_grad_(True)
    vr = dv.forward_kl(ref, zt16.float().requires_grad_(True))
    vr.sum().backward()
    torch.testing.assert_close(val, vr.detach())
    torch.testing.assert_close(zs16.grad.float(), ref.grad, atol=1e-2, rtol=1e-2)


def test_forward_kl_constant_teacher_backward_twice_keeps_saved_tensors():
    zs = _logits(3, 20, seed=7).requires_grad_(True)
    val = dv.forward_kl(zs, _logits(3, 20, seed=8)).sum()
    g1, = torch.autograd.grad(val, zs, retain_graph=True)
    g2, = torch.autograd.grad(val, zs)
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)


def test_label_rows_gather_equals_masking_values_and_gradients():
    from mckd.criteria.common import cross_entropy_sum, gather_rows, label_mask, label_rows
    labels = torch.tensor([[-100, 3, 1, -100], [2, -100, -100, 0]])
    z = _logits(2, 4, 5, seed=9).requires_grad_(True)
    rows = label_rows(label_mask(labels))
    assert rows.tolist() == [1, 2, 4, 7]
    zr = gather_rows(z, rows)
    assert zr.shape == (4, 5)
    torch.testing.assert_close(zr, z.detach()[label_mask(labels)])
    loss, _ = cross_entropy_sum(z, labels, label_smoothing=0.1)
    loss.backward()
    zf = z.detach().reshape(-1, 5).requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(zf, labels.reshape(-1), ignore_index=-100, reduction="sum",
                                            label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(z.grad.reshape(-1, 5), zf.grad)
    assert (z.grad[~label_mask(labels)] == 0).all()


@pytest.mark.parametrize("pairing_kind", ["position", "aligned"])
@pytest.mark.parametrize("lengths", [(7, 9), (9, 7)])
def test_mcw_topk_on_ot_rows_only_keeps_ot_values_and_gradients(pairing_kind, lengths):
    from mckd.criteria.mcw.ot import logit_costs, multi_cost_ot, topk_distributions
    T_t, T_s = lengths
    g = torch.Generator().manual_seed(11)
    s_mask = torch.rand(2, T_s, generator=g) > 0.4
    t_mask = torch.rand(2, T_t, generator=g) > 0.4
    s_mask[:, 3] = t_mask[:, 3] = True
    s_mask[:, :2] = t_mask[:, :2] = False            # leading and trailing rows no example uses
    s_mask[:, -1] = t_mask[:, -1] = False
    pairing = torch.randint(0, T_s, (2, T_t), generator=g) if pairing_kind == "aligned" else None
    zs0, zt = _logits(2, T_s, 30, seed=12, dtype=torch.float32), _logits(2, T_t, 40, seed=13, dtype=torch.float32)
    out = []
    for masks in (None, (t_mask, s_mask)):
        zs = zs0.clone().requires_grad_(True)
        kw = {} if masks is None else dict(teacher_mask=masks[0], student_mask=masks[1])
        p_s, p_t = topk_distributions(zs, zt, k=6, temperature=2.0, t=0.3, pairing=pairing, **kw)
        costs = logit_costs(p_t, p_s, torch.zeros(2, T_t), torch.zeros(2, T_s))
        ot = multi_cost_ot(costs, torch.tensor([0.2, 0.5, 0.3]), t_mask, s_mask, epsilon=0.1,
                           epsilon_mode="mean", n_iters=20, grad="unrolled")
        ot.value.sum().backward()
        out.append((p_s.detach(), p_t.detach(), ot.value.detach(), zs.grad))
    (ps_a, pt_a, v_a, g_a), (ps_b, pt_b, v_b, g_b) = out
    torch.testing.assert_close(ps_a[s_mask], ps_b[s_mask], atol=0, rtol=0)
    torch.testing.assert_close(pt_a[t_mask], pt_b[t_mask], atol=0, rtol=0)
    torch.testing.assert_close(v_a, v_b)
    torch.testing.assert_close(g_a, g_b)
    assert g_a.abs().sum() > 0
