"""Test battery for cross_entropy, various_divergence, dual_space_kd and dual_space_kd_with_cma.

Models are stand-ins (random embedding tables, heads, hidden states): the criteria never call a
model, so only the tensors matter. Oracles loop over examples and positions with the published
formulas (divergences, DSKD and its CMA variant) in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mckd.criteria import get_criterion_class
from mckd.criteria.base import ModelView
from mckd.criteria.dual_space_kd_with_cma import cma_losses, normalize_scale

B, TS, TT, VS, VT, DS, DT = 3, 7, 9, 23, 31, 6, 10


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(B_, T, V, seed, start=2):
    g = _gen(seed)
    lab = torch.randint(0, V, (B_, T), generator=g)
    lab[:, :start] = -100
    for b in range(B_):                 # ragged responses: right padding
        lab[b, T - b:] = -100
    return lab


class Pair:
    """Random student/teacher stand-ins: embeddings, heads, hidden states, logits, batch."""

    def __init__(self, seed=0, same_vocab=False, dtype=torch.float32):
        torch.manual_seed(seed)
        vt, tt = (VS, TS) if same_vocab else (VT, TT)
        self.es, self.et = nn.Embedding(VS, DS).to(dtype), nn.Embedding(vt, DT).to(dtype)
        self.hs, self.ht = nn.Linear(DS, VS, bias=False).to(dtype), nn.Linear(DT, vt, bias=False).to(dtype)
        g = _gen(seed + 1)
        self.h_s = torch.randn(B, TS, DS, generator=g, dtype=dtype).requires_grad_(True)
        self.h_t = torch.randn(B, tt, DT, generator=g, dtype=dtype)
        self.z_t = self.ht(self.h_t).detach() * 2
        self.batch = dict(input_ids=torch.randint(0, VS, (B, TS), generator=g),
                          labels=_labels(B, TS, VS, seed + 2))
        if not same_vocab:
            self.batch.update(teacher_input_ids=torch.randint(0, vt, (B, tt), generator=g),
                              teacher_labels=_labels(B, tt, vt, seed + 3, start=3))

    def views(self):
        z_s = self.hs(self.h_s) * 2
        return (ModelView(z_s, self.h_s, self.es, self.hs),
                ModelView(self.z_t, self.h_t, self.et, self.ht))


def _pad(t, n, value):
    """Append n positions (dim 1) filled with ``value`` (or random garbage when value is None)."""
    shape = list(t.shape)
    shape[1] = n
    extra = torch.randn(shape, dtype=t.dtype) * 5 if value is None else torch.full(shape, value, dtype=t.dtype)
    return torch.cat([t, extra], dim=1)


def _padded(pair, n=4):
    """The same examples with n extra padding positions on both sides (garbage activations)."""
    s, t = pair.views()
    batch = {k: _pad(v, n, -100 if "labels" in k else 0) for k, v in pair.batch.items()}
    h_s = _pad(pair.h_s.detach(), n, None).requires_grad_(True)
    z_s = torch.cat([s.logits, torch.randn(B, n, s.logits.shape[-1]) * 5], 1)
    s2 = ModelView(z_s, h_s, s.embed_tokens, s.lm_head)
    tn = n if "teacher_labels" in pair.batch else n
    t2 = ModelView(_pad(t.logits, tn, None), _pad(t.hidden, tn, None), t.embed_tokens, t.lm_head)
    return batch, s2, t2


def _build(name, **kw):
    cls = get_criterion_class(name)
    if name in ("dual_space_kd", "dual_space_kd_with_cma"):
        torch.manual_seed(123)
        return cls(DS, DT, **kw)
    return cls(**kw)


CASES = [("cross_entropy", {}, True), ("various_divergence", {}, True),
         ("various_divergence", dict(kd_objective="adaptive_kl", loss_combination="additive"), True),
         ("dual_space_kd", {}, True), ("dual_space_kd_with_cma", {}, False),
         ("dual_space_kd_with_cma", dict(normalization="token_rms", t2s_accuracy_mask=False,
                                         kd_objective="reverse_kl", teacher_temperature=2.0), False)]


# ------------------------------------------------------------------------------- references
def test_cross_entropy_matches_f_cross_entropy():
    pair = Pair(0, same_vocab=True)
    s, _ = pair.views()
    out = _build("cross_entropy", label_smoothing=0.1)(pair.batch, s, None)
    ref = F.cross_entropy(s.logits.reshape(-1, VS), pair.batch["labels"].reshape(-1), reduction="sum",
                          label_smoothing=0.1)
    torch.testing.assert_close(out.loss_sum, ref)
    assert out.n_tokens == (pair.batch["labels"] != -100).sum()


@pytest.mark.parametrize("combination,lam", [("published", 0.3), ("additive", 0.3)])
def test_various_divergence_matches_f_kl_div(combination, lam):
    pair = Pair(1, same_vocab=True)
    s, t = pair.views()
    out = _build("various_divergence", kd_rate=lam, kd_temperature=2.0, loss_combination=combination)(
        pair.batch, s, t)
    lab = pair.batch["labels"]
    m = lab != -100
    ce = F.cross_entropy(s.logits[m], lab[m], reduction="sum")
    kd = F.kl_div(F.log_softmax(s.logits[m] / 2, -1), F.log_softmax(t.logits[m] / 2, -1), log_target=True,
                  reduction="sum")
    ref = (1 - lam) * ce + lam * kd if combination == "published" else ce + lam * kd
    torch.testing.assert_close(out.loss_sum, ref)
    torch.testing.assert_close(out.metrics["kd_loss"], kd)


def test_various_divergence_zero_kd_on_identical_models():
    pair = Pair(2, same_vocab=True)
    s, _ = pair.views()
    for obj in ("forward_kl", "js_divergence", "tvd", "adaptive_kl"):
        out = _build("various_divergence", kd_objective=obj)(pair.batch, s, s)
        assert abs(out.metrics["kd_loss"].item()) < 1e-5, obj


def _dskd_oracle(pair, lam=0.5, tau=1.0):
    """Spec 6.2, one position at a time, float64."""
    crit = _build("dual_space_kd")
    s, t = pair.views()
    lab = pair.batch["labels"]
    t2s, s2t = crit.projectors["t2s"].double(), crit.projectors["s2t"].double()
    Ws, Wt = pair.hs.weight.double(), pair.ht.weight.double()
    ce = kd = 0.0
    for b in range(B):
        for i in range(TS):
            y = int(lab[b, i])
            if y == -100:
                continue
            zs = s.logits[b, i].double()
            ce = ce - torch.log_softmax(zs, -1)[y]
            z_t2s = t2s(pair.h_t[b, i].double()) @ Ws.T
            kd = kd - torch.log_softmax(z_t2s, -1)[y]
            q, lp = torch.softmax(z_t2s / tau, -1), torch.log_softmax(zs / tau, -1)
            kd = kd + (q * (q.log() - lp)).sum()
            z_s2t = s2t(pair.h_s[b, i].double()) @ Wt.T
            q, lp = torch.softmax(t.logits[b, i].double() / tau, -1), torch.log_softmax(z_s2t / tau, -1)
            kd = kd + (q * (q.log() - lp)).sum()
    return (1 - lam) * ce + lam * kd


def test_dual_space_kd_matches_oracle():
    pair = Pair(3, same_vocab=True)
    s, t = pair.views()
    out = _build("dual_space_kd", kd_temperature=1.0)(pair.batch, s, t)
    torch.testing.assert_close(out.loss_sum.double(), _dskd_oracle(pair), atol=1e-4, rtol=1e-5)


def _cma_oracle(pair, crit, tau=1.0, tau_t=1.0, acc_mask=True):
    """Spec 6.3 for normalization='masked_std', one example and position at a time, float64."""
    s, t = pair.views()
    bt = pair.batch
    lab, tlab = bt["labels"], bt["teacher_labels"]
    P = {k: v.double() for k, v in crit.projectors.items()}
    Es, Et = pair.es.weight.double(), pair.et.weight.double()
    Ws, Wt = pair.hs.weight.double(), pair.ht.weight.double()
    ms, mt = lab != -100, tlab != -100
    # global stds over the teacher label positions (the masked_std definition)
    k_all = torch.cat([Et[bt["teacher_input_ids"][mt]], Et[tlab[mt]]], -1)
    std_k, std_e, std_h = k_all.std(), Et[tlab[mt]].std(), pair.h_t[mt].double().std()
    ce = t2s_kd = s2t_kd = 0.0
    for b in range(B):
        si, tj = ms[b].nonzero().flatten().tolist(), mt[b].nonzero().flatten().tolist()
        if not si or not tj:
            continue
        Q = torch.stack([P["query"](torch.cat([Es[bt["input_ids"][b, i]], Es[lab[b, i]]])) for i in si])
        K = torch.stack([torch.cat([Et[bt["teacher_input_ids"][b, j]], Et[tlab[b, j]]]) / std_k for j in tj])
        Vt = torch.stack([P["t2s"](pair.h_t[b, j].double() / std_h + Et[tlab[b, j]] / std_e) for j in tj])
        Vs = torch.stack([P["s2t"](pair.h_s[b, i].double()) for i in si])
        A = Q @ K.T / math.sqrt(2 * DT)
        for a, i in enumerate(si):
            z = (torch.softmax(A[a], -1) @ Vt) @ Ws.T
            y = int(lab[b, i])
            ce = ce - torch.log_softmax(z, -1)[y]
            if int(z.argmax()) == y or not acc_mask:
                q = torch.softmax(z / (tau * tau_t), -1)
                lp = torch.log_softmax(s.logits[b, i].double() / tau, -1)
                t2s_kd = t2s_kd + (q * (q.log() - lp)).sum()
        for c, j in enumerate(tj):
            z = (torch.softmax(A[:, c], -1) @ Vs) @ Wt.T
            q = torch.softmax(t.logits[b, j].double() / tau, -1)
            s2t_kd = s2t_kd + (q * (q.log() - torch.log_softmax(z / tau, -1))).sum()
    return ce, t2s_kd, s2t_kd


@pytest.mark.parametrize("acc_mask", [True, False])
def test_cma_matches_per_example_oracle(acc_mask):
    pair = Pair(4)
    crit = _build("dual_space_kd_with_cma", kd_temperature=2.0, teacher_temperature=1.5,
                  t2s_accuracy_mask=acc_mask)
    # make the projected teacher right on some positions so the accuracy mask matters
    s, t = pair.views()
    out = crit(pair.batch, s, t)
    ce, t2s_kd, s2t_kd = _cma_oracle(pair, crit, tau=2.0, tau_t=1.5, acc_mask=acc_mask)
    torch.testing.assert_close(out.metrics["t2s_ce_loss"].double(), ce, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.metrics["t2s_kd_loss"].double(), torch.as_tensor(t2s_kd, dtype=torch.float64),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.metrics["s2t_kd_loss"].double(), s2t_kd, atol=1e-4, rtol=1e-5)


def test_cma_accuracy_mask_selects_gold_positions():
    """With the t2s KD on all positions the value is larger than on the gold-predicting subset."""
    pair = Pair(5)
    s, t = pair.views()
    on = _build("dual_space_kd_with_cma")(pair.batch, s, t).metrics
    off = _build("dual_space_kd_with_cma", t2s_accuracy_mask=False)(pair.batch, s, t).metrics
    assert off["t2s_kd_loss"] > on["t2s_kd_loss"] >= 0
    if on["t2s_acc"] == 0:
        assert on["t2s_kd_loss"] == 0


# ------------------------------------------------------------------------------- battery
@pytest.mark.parametrize("name,kw,same", CASES)
def test_padding_never_changes_the_value(name, kw, same):
    pair = Pair(6, same_vocab=(name != "dual_space_kd_with_cma"))
    s, t = pair.views()
    crit = _build(name, **kw)
    ref = crit(pair.batch, s, t)
    batch, s2, t2 = _padded(pair)
    out = crit(batch, s2, t2)
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, atol=1e-4, rtol=1e-5)
    assert out.n_tokens == ref.n_tokens
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k].float(), ref.metrics[k].float(), atol=1e-4, rtol=1e-5)


def test_cma_published_normalization_depends_on_padding():
    """Documented published defect: one std over the padded tensor."""
    pair = Pair(7)
    s, t = pair.views()
    crit = _build("dual_space_kd_with_cma", normalization="published")
    ref = crit(pair.batch, s, t).loss_sum
    batch, s2, t2 = _padded(pair)
    assert not torch.allclose(crit(batch, s2, t2).loss_sum, ref)


@pytest.mark.parametrize("name,kw,same", CASES)
def test_all_masked_gives_finite_zero_with_gradients(name, kw, same):
    pair = Pair(8, same_vocab=(name != "dual_space_kd_with_cma"))
    for k in pair.batch:
        if "labels" in k:
            pair.batch[k] = torch.full_like(pair.batch[k], -100)
    s, t = pair.views()
    crit = _build(name, **kw)
    out = crit(pair.batch, s, t)
    assert out.loss_sum.item() == 0.0 and out.n_tokens.item() == 0
    out.loss_sum.backward()
    assert torch.isfinite(pair.h_s.grad).all()
    for p in crit.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert all(torch.isfinite(v.float()).all() for v in out.metrics.values())


@pytest.mark.parametrize("name,kw,same", [c for c in CASES if c[1].get("normalization") == "token_rms"
                                          or c[0] != "dual_space_kd_with_cma"])
def test_batched_equals_sum_of_single_examples(name, kw, same):
    """Token sums are additive over examples (for CMA with the per-token normalisation)."""
    pair = Pair(9, same_vocab=(name != "dual_space_kd_with_cma"))
    s, t = pair.views()
    crit = _build(name, **kw)
    full = crit(pair.batch, s, t)
    total = 0.0
    for b in range(B):
        sl = slice(b, b + 1)
        sb = ModelView(s.logits[sl], s.hidden[sl], s.embed_tokens, s.lm_head)
        tb = ModelView(t.logits[sl], t.hidden[sl], t.embed_tokens, t.lm_head)
        total = total + crit({k: v[sl] for k, v in pair.batch.items()}, sb, tb).loss_sum
    torch.testing.assert_close(full.loss_sum, total, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name,kw,same", CASES[1:])
def test_inputs_are_not_mutated_and_trainable_parts_get_gradients(name, kw, same):
    pair = Pair(10, same_vocab=(name != "dual_space_kd_with_cma"))
    s, t = pair.views()
    before = {k: v.clone() for k, v in pair.batch.items()}
    zt = t.logits.clone()
    crit = _build(name, **kw)
    crit(pair.batch, s, t).loss_sum.backward()
    assert all(torch.equal(before[k], pair.batch[k]) for k in before) and torch.equal(zt, t.logits)
    assert pair.h_s.grad is not None and pair.h_s.grad.abs().sum() > 0
    for n, p in crit.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_cma_gradcheck_float64():
    pair = Pair(11, dtype=torch.float64)
    crit = _build("dual_space_kd_with_cma", t2s_accuracy_mask=False).double()
    s, t = pair.views()

    def f(h_s):
        return cma_losses(student_logits=pair.hs(h_s), student_hidden=h_s, teacher_logits=t.logits,
                          teacher_hidden=t.hidden, input_ids=pair.batch["input_ids"],
                          labels=pair.batch["labels"], teacher_input_ids=pair.batch["teacher_input_ids"],
                          teacher_labels=pair.batch["teacher_labels"], student_embed=pair.es,
                          teacher_embed=pair.et, student_head_weight=pair.hs.weight,
                          teacher_head_weight=pair.ht.weight, query_proj=crit.projectors["query"],
                          t2s_proj=crit.projectors["t2s"], s2t_proj=crit.projectors["s2t"],
                          t2s_accuracy_mask=False).kd

    h = pair.h_s.detach()[:1, :5].clone().requires_grad_(True)
    pair.batch = {k: v[:1, :5] if not k.startswith("teacher") else v[:1] for k, v in pair.batch.items()}
    t = ModelView(t.logits[:1], t.hidden[:1], t.embed_tokens, t.lm_head)
    assert torch.autograd.gradcheck(f, (h,), eps=1e-6, atol=1e-5)


def test_normalize_scale_variants():
    x = torch.randn(2, 5, 4)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(normalize_scale(x, m, "masked_std"), x / x[m].std())
    torch.testing.assert_close(normalize_scale(x, m, "published"), x / x.std())
    rms = normalize_scale(x, m, "token_rms").pow(2).mean(-1)
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="--cma-normalization"):
        normalize_scale(x, m, "layer")


def test_same_vocab_criteria_reject_mismatched_models():
    pair = Pair(12)
    s, t = pair.views()
    with pytest.raises(ValueError, match="share one tokenizer"):
        _build("various_divergence")(pair.batch, s, t)
    with pytest.raises(ValueError, match="same positions"):
        _build("dual_space_kd")(pair.batch, s, t)
