"""Test battery for universal_logit_distillation and multi_level_ot.

Oracles are literal per-example re-statements of the published algorithms: ``torch.roll`` to the
response start, full sorts, Python loops, float64.
"""
from __future__ import annotations

import pytest
import torch

from mckd.criteria import get_criterion_class
from mckd.criteria.base import ModelView
from mckd.criteria.universal_logit_distillation import response_start_alignment, sorted_l1

B, T, VS, VT = 3, 10, 23, 31


def _labels(T_, V, seed, starts, ends):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, (len(starts), T_), generator=g)
    for b, (s, e) in enumerate(zip(starts, ends)):
        lab[b, :s] = -100
        lab[b, e:] = -100
    return lab


def _case(seed=0, T_s=T, T_t=T, vs=VS, vt=VT):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(B, T_s, vs, generator=g) * 3).requires_grad_(True)
    zt = torch.randn(B, T_t, vt, generator=g) * 3
    batch = dict(labels=_labels(T_s, vs, seed + 1, [2, 3, 1], [T_s, T_s - 2, T_s - 4]),
                 teacher_labels=_labels(T_t, vt, seed + 2, [3, 1, 2], [T_t - 1, T_t, T_t - 3]))
    return batch, zs, zt


def _run(name, batch, zs, zt, **kw):
    crit = get_criterion_class(name)(**kw)
    return crit(batch, ModelView(zs, None, None, None), ModelView(zt, None, None, None))


def _first(lab):
    return int((lab != -100).nonzero()[0]) if (lab != -100).any() else 0


# ----------------------------------------------------------------------------------- ULD
def _uld_oracle(batch, zs, zt):
    """Published ULD: roll labels and logits to the response start, sort full vocabularies."""
    lab, tlab = batch["labels"].clone(), batch["teacher_labels"].clone()
    zs, zt = zs.detach().double().clone(), zt.double().clone()
    total = 0.0
    for b in range(B):
        s0, t0 = _first(lab[b]), _first(tlab[b])
        ls, lt = torch.roll(lab[b], -s0), torch.roll(tlab[b], -t0)
        ps = torch.softmax(torch.roll(zs[b], -s0, 0), -1).sort(-1, descending=True).values
        qs = torch.softmax(torch.roll(zt[b], -t0, 0), -1).sort(-1, descending=True).values
        v = max(ps.shape[-1], qs.shape[-1])
        ps = torch.nn.functional.pad(ps, (0, v - ps.shape[-1]))
        qs = torch.nn.functional.pad(qs, (0, v - qs.shape[-1]))
        n = min(len(ls), len(lt))
        for i in range(n):
            if ls[i] != -100 and lt[i] != -100:
                total = total + (ps[i] - qs[i]).abs().sum()
    return total


@pytest.mark.parametrize("vs,vt", [(VS, VT), (VT, VS), (VS, VS)])
def test_uld_matches_published_oracle(vs, vt):
    batch, zs, zt = _case(0, vs=vs, vt=vt)
    out = _run("universal_logit_distillation", batch, zs, zt, kd_rate=0.3)
    torch.testing.assert_close(out.metrics["uld_loss"].double(), torch.as_tensor(_uld_oracle(batch, zs, zt)),
                               atol=1e-5, rtol=1e-5)
    ce = out.metrics["nll_loss"]
    torch.testing.assert_close(out.loss_sum, 0.7 * ce + 0.3 * out.metrics["uld_loss"])
    add = _run("universal_logit_distillation", batch, zs, zt, kd_rate=0.3, loss_combination="additive")
    torch.testing.assert_close(add.loss_sum, ce + 0.3 * out.metrics["uld_loss"])


def test_uld_zero_for_identical_and_vocab_permuted_teacher():
    batch, zs, _ = _case(1, vs=VS, vt=VS)
    batch["teacher_labels"] = batch["labels"].clone()
    perm = torch.randperm(VS, generator=torch.Generator().manual_seed(0))
    out = _run("universal_logit_distillation", batch, zs, zs.detach()[..., perm])
    assert out.metrics["uld_loss"].abs().item() < 1e-5


def test_alignment_pairs_response_positions():
    lab = torch.tensor([[-100, -100, 5, 6, 7, -100]])
    tlab = torch.tensor([[-100, 1, 2, -100]])
    idx_s, idx_t, valid = response_start_alignment(lab, tlab)
    assert valid.tolist() == [[True, True, False, False]]
    assert idx_s[0, :2].tolist() == [2, 3] and idx_t[0, :2].tolist() == [1, 2]


# ----------------------------------------------------------------------------------- MultiLevelOT
def _scaled_probs(z, temp):
    return torch.softmax(z / (z.std(-1, keepdim=True) + 1e-4) / temp, -1)


def _uniform_marginal_plan(W, eps, iters):
    """Sinkhorn plan with marginals 1/M and 1/N (u-v scaling, u first initialised to 1/M)."""
    M, N = W.shape
    K = torch.exp(-W / eps)
    u = torch.full((M,), 1.0 / M, dtype=W.dtype)
    for _ in range(iters):
        v = (1.0 / N) / (K.T @ u)
        u = (1.0 / M) / (K @ v)
    return u[:, None] * K * v[None, :]


def _mlot_fixed_oracle(batch, zs, zt, k=50, temp=2.0):
    lab, tlab = batch["labels"], batch["teacher_labels"]
    l1 = kl = ot = 0.0
    for b in range(B):
        s0, t0 = _first(lab[b]), _first(tlab[b])
        pairs = [(s0 + i, t0 + i) for i in range(min(lab.shape[1], tlab.shape[1]))
                 if s0 + i < lab.shape[1] and t0 + i < tlab.shape[1]
                 and lab[b, s0 + i] != -100 and tlab[b, t0 + i] != -100]
        if not pairs:
            continue
        P = torch.stack([_scaled_probs(zs[b, i].detach().double(), temp).sort(descending=True).values[:k]
                         for i, _ in pairs])
        Q = torch.stack([_scaled_probs(zt[b, j].double(), temp).sort(descending=True).values[:k]
                         for _, j in pairs])
        kk = max(P.shape[1], Q.shape[1])
        P = torch.nn.functional.pad(P, (0, kk - P.shape[1]))
        Q = torch.nn.functional.pad(Q, (0, kk - Q.shape[1]))
        l1 = l1 + (P - Q).abs().sum()
        kl = kl - (Q * P.log()).sum()
        W = (P[:, None, :] - Q[None, :, :]).abs().sum(-1)
        ot = ot + len(pairs) * (_uniform_marginal_plan(W, 0.1, 10) * W).sum()
    return l1 + 0.1 * kl + 1e-4 * ot


def _mlot_published_oracle(batch, zs, zt, k=50, temp=2.0, terms=("ot", "kl", "l1")):
    """The published Multi-Level OT term, literally: loops over examples, positions and Sinkhorn
    iterations, float64.

    Per example the rows are rolled to the first label (``torch.roll``) and cut to the common length
    ``L = min(T_s, T_t)``. ``z / (std + 1e-4)``; ``p``, ``q`` = softmax(. / 2); one vocabulary
    order per side by mass summed over batch and positions, first ``k`` columns kept; then
        OT = 0.1 * sum_b 0.001 * <P_b, W_b>, W_b[i, j] = |softmax(p_i / 2) - softmax(q_j / 2)|_1,
             P_b = exp(-W_b / 0.1), then 10 times: rows divided by their sums, then columns
        KL = 0.1 * mean over the B * L positions of -sum softmax(q) * log_softmax(p)
        L1 = mean over the B * L positions of sum |p - q|
    and the term is (OT + KL + L1) * (number of positions labelled on both sides).
    ``terms`` selects which of the three levels enter (all of them: the published term).
    """
    lab, tlab = batch["labels"], batch["teacher_labels"]
    n_b, L = lab.shape[0], min(lab.shape[1], tlab.shape[1])

    def probs(z):
        return torch.softmax(z / (z.std(-1, keepdim=True) + 1e-4) / temp, -1)

    p_rows, q_rows, n_valid = [], [], 0
    for b in range(n_b):
        s0, t0 = _first(lab[b]), _first(tlab[b])
        p_rows.append(probs(torch.roll(zs[b].double(), -s0, 0)[:L]))
        q_rows.append(probs(torch.roll(zt[b].detach().double(), -t0, 0)[:L]))
        ls, lt = torch.roll(lab[b], -s0)[:L], torch.roll(tlab[b], -t0)[:L]
        n_valid += sum(int(ls[i] != -100 and lt[i] != -100) for i in range(L))
    p, q = torch.stack(p_rows), torch.stack(q_rows)
    p = p[..., p.detach().sum((0, 1)).argsort(descending=True)[:k]]
    q = q[..., q.sum((0, 1)).argsort(descending=True)[:k]]
    kk = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, kk - p.shape[-1]))
    q = torch.nn.functional.pad(q, (0, kk - q.shape[-1]))
    ot = kl = l1 = 0.0
    for b in range(n_b):
        ps, qs = torch.softmax(p[b] / 2, -1), torch.softmax(q[b] / 2, -1)
        W = torch.stack([torch.stack([(ps[i] - qs[j]).abs().sum() for j in range(L)]) for i in range(L)])
        P = torch.exp(-W / 0.1)
        for _ in range(10):
            P = P / P.sum(1, keepdim=True)
            P = P / P.sum(0, keepdim=True)
        ot = ot + 0.001 * (P * W).sum()
        for i in range(L):
            kl = kl - (torch.softmax(q[b, i], -1) * torch.log_softmax(p[b, i], -1)).sum()
            l1 = l1 + (p[b, i] - q[b, i]).abs().sum()
    parts = {"ot": 0.1 * ot, "kl": 0.1 * kl / (n_b * L), "l1": l1 / (n_b * L)}
    return sum(parts[t] for t in terms) * n_valid


def test_mlot_fixed_matches_oracle():
    batch, zs, zt = _case(2, T_s=8, T_t=11, vs=60, vt=70)
    out = _run("multi_level_ot", batch, zs, zt, kd_rate=2.0)
    ref = _mlot_fixed_oracle(batch, zs, zt)
    torch.testing.assert_close(out.metrics["kd_loss"].double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss_sum, out.metrics["nll_loss"] + 2.0 * out.metrics["kd_loss"])


def _peaked_case(seed, T_s=T, T_t=T, vs=60, vt=70, student_scale=3.0):
    """Teacher rows with one dominant logit (a confident, trained-like teacher): there the KL
    level's gradient is not negligible, unlike on random-init logits."""
    batch, zs, zt = _case(seed, T_s=T_s, T_t=T_t, vs=vs, vt=vt)
    g = torch.Generator().manual_seed(seed + 100)
    zt = zt.clone()
    zt.scatter_(-1, torch.randint(0, vt, (B, T_t, 1), generator=g), 40.0)
    zs = (zs.detach().double() * (student_scale / 3.0)).requires_grad_(True)
    return batch, zs, zt.double()


def _ce(batch, z):
    return torch.nn.functional.cross_entropy(z.flatten(0, 1), batch["labels"].flatten(), reduction="sum")


def _oracle_grad(batch, zs, zt, terms=("ot", "kl", "l1")):
    """The published Multi-Level OT term and its gradient with respect to the student logits."""
    z = zs.detach().clone().requires_grad_(True)
    kd = _mlot_published_oracle(batch, z, zt, terms=terms)
    kd.backward()
    return kd.detach(), z.grad


def _published_grad(batch, zs, zt, kd_rate=0.7):
    """Run the criterion; return its KD term, and the gradient of ``(loss - CE) / kd_rate`` (the
    gradient of the KD term alone, so that the check is not diluted by the CE gradient)."""
    z = zs.detach().clone().requires_grad_(True)
    out = _run("multi_level_ot", batch, z, zt, variant="published", kd_rate=kd_rate)
    torch.testing.assert_close(out.loss_sum.detach(), _ce(batch, z.detach()) + kd_rate * out.metrics["kd_loss"])
    ((out.loss_sum - _ce(batch, z)) / kd_rate).backward()
    return out.metrics["kd_loss"], z.grad


@pytest.mark.parametrize("T_s,T_t,student_scale", [(T, T, 3.0), (T, T, 1e-3), (8, 11, 3.0)])
def test_mlot_published_matches_oracle(T_s, T_t, student_scale):
    """Value and gradient equal the published formulas to 1e-5 relative, on peaked teachers; the
    small student scale makes the +1e-4 of the std normalisation matter."""
    batch, zs, zt = _peaked_case(3, T_s, T_t, student_scale=student_scale)
    value, grad = _published_grad(batch, zs, zt)
    ref, ref_grad = _oracle_grad(batch, zs, zt)
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())
    # the check is sensitive to the KL level: its share of the gradient (about 2e-4 here) is well
    # above the tolerance
    _, no_kl = _oracle_grad(batch, zs, zt, terms=("ot", "l1"))
    assert (ref_grad - no_kl).norm() > 1e-4 * ref_grad.norm()


def test_mlot_published_float32_matches_oracle():
    batch, zs, zt = _peaked_case(11)
    zs32, zt32 = zs.detach().float(), zt.float()
    value, grad = _published_grad(batch, zs32, zt32)
    ref, ref_grad = _oracle_grad(batch, zs32.double(), zt32.double())
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=2e-5 * ref_grad.abs().max().item())


# ----------------------------------------------------------------------------------- battery
CASES = [("universal_logit_distillation", {}), ("multi_level_ot", {})]


def _pad(batch, zs, zt, n_s, n_t):
    b2 = dict(labels=torch.cat([batch["labels"], torch.full((B, n_s), -100)], 1),
              teacher_labels=torch.cat([batch["teacher_labels"], torch.full((B, n_t), -100)], 1))
    zs2 = torch.cat([zs, torch.randn(B, n_s, zs.shape[-1]) * 5], 1)
    zt2 = torch.cat([zt, torch.randn(B, n_t, zt.shape[-1]) * 5], 1)
    return b2, zs2, zt2


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("n_s,n_t", [(4, 0), (0, 5), (3, 3)])
def test_padding_never_changes_the_value(name, kw, n_s, n_t):
    batch, zs, zt = _case(4)
    ref = _run(name, batch, zs, zt, **kw)
    out = _run(name, *_pad(batch, zs, zt, n_s, n_t), **kw)
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, atol=1e-4, rtol=1e-5)
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k].float(), ref.metrics[k].float(), atol=1e-4, rtol=1e-5)


def test_mlot_published_variant_depends_on_padding():
    batch, zs, zt = _case(5)
    ref = _run("multi_level_ot", batch, zs, zt, variant="published").loss_sum
    assert not torch.allclose(_run("multi_level_ot", *_pad(batch, zs, zt, 3, 3), variant="published").loss_sum, ref)


@pytest.mark.parametrize("name,kw", CASES + [("multi_level_ot", {"variant": "published"})])
def test_all_masked_gives_finite_zero_with_gradients(name, kw):
    batch, zs, zt = _case(6)
    batch = {k: torch.full_like(v, -100) for k, v in batch.items()}
    out = _run(name, batch, zs, zt, **kw)
    assert out.loss_sum.item() == 0.0
    out.loss_sum.backward()
    assert zs.grad is not None and torch.isfinite(zs.grad).all()
    assert all(torch.isfinite(v.float()).all() for v in out.metrics.values())


@pytest.mark.parametrize("name,kw", CASES)
def test_batched_equals_sum_of_single_examples(name, kw):
    batch, zs, zt = _case(7)
    full = _run(name, batch, zs, zt, **kw).loss_sum
    total = sum(_run(name, {k: v[b:b + 1] for k, v in batch.items()}, zs[b:b + 1], zt[b:b + 1], **kw).loss_sum
                for b in range(B))
    torch.testing.assert_close(full, total, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name,kw", CASES + [("multi_level_ot", {"variant": "published"})])
def test_inputs_are_not_mutated(name, kw):
    batch, zs, zt = _case(8)
    before = ({k: v.clone() for k, v in batch.items()}, zs.detach().clone(), zt.clone())
    _run(name, batch, zs, zt, **kw).loss_sum.backward()
    assert all(torch.equal(before[0][k], batch[k]) for k in batch)
    assert torch.equal(before[1], zs.detach()) and torch.equal(before[2], zt)
    assert zs.grad.abs().sum() > 0


def test_sorted_l1_gradcheck_float64():
    g = torch.Generator().manual_seed(9)
    p = torch.softmax(torch.randn(3, 6, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    q = torch.softmax(torch.randn(3, 8, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: sorted_l1(x, q, chunk_rows=2), (p,), eps=1e-7, atol=1e-5)


def test_mlot_fixed_gradcheck_float64():
    from mckd.criteria.multi_level_ot import multi_level_ot_fixed
    g = torch.Generator().manual_seed(10)
    zs = torch.randn(2, 4, 9, generator=g, dtype=torch.float64).requires_grad_(True)
    zt = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert torch.autograd.gradcheck(lambda x: multi_level_ot_fixed(x, zt, valid, top_k=5)["multi"], (zs,),
                                    eps=1e-6, atol=1e-5)


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="--mlot-variant"):
        get_criterion_class("multi_level_ot")(variant="paper")
