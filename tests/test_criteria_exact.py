"""Unit battery of the exact-alignment criteria and Soft-DTW: per-example oracles, gradcheck in
float64, padding invariance, all-masked inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mckd.criteria.base import ModelView
from mckd.criteria.dual_space_kd_v2 import eta_dual_space_terms, normalize_terms
from mckd.criteria.dwa_kd import DWAKD, dual_space_weights, dtw_terms, response_sequences
from mckd.criteria.uld_hybrid import ULDHybrid, group_log_scale, uld_hybrid_loss
from mckd.data.shared_vocab import build_shared_vocab_map
from mckd.ot.costs import pairwise_cosine_distance
from mckd.ot.soft_dtw import soft_dtw, soft_dtw_divergence

DT = torch.float64
B, T_S, T_T, V_S, V_T, D_S, D_T = 2, 7, 8, 11, 13, 4, 5


# --------------------------------------------------------------------------- fixtures
def make_batch(seed=0, dtype=DT):
    """Two examples: prompt (-100), response labels, right padding; hand-made exact/boundary pairs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((B, T_S), -100)
    labels[0, 2:7] = torch.randint(0, V_S, (5,), generator=g)
    labels[1, 1:4] = torch.randint(0, V_S, (3,), generator=g)
    t_labels = torch.full((B, T_T), -100)
    t_labels[0, 3:8] = torch.randint(0, V_T, (5,), generator=g)
    t_labels[1, 2:6] = torch.randint(0, V_T, (4,), generator=g)
    exact = torch.full((B, T_S), -1)
    boundary = torch.full((B, T_S), -1)
    # example 0: student 2..6 vs teacher 3..7; (2,3) (3,4) exact, student 4+5 vs teacher 5 a group, (6,7) exact
    for i, j in ((2, 3), (3, 4), (6, 7)):
        exact[0, i] = j
    for i, j in ((2, 3), (3, 4), (5, 5), (6, 7)):
        boundary[0, i] = j
    # example 1: student 1..3 vs teacher 2..5; (1,2) exact, student 2 vs teacher 3+4 a group, (3,5) exact
    for i, j in ((1, 2), (3, 5)):
        exact[1, i] = j
    for i, j in ((1, 2), (2, 4), (3, 5)):
        boundary[1, i] = j
    att_s = torch.zeros(B, T_S, dtype=torch.long)
    att_s[0, :7], att_s[1, :4] = 1, 1
    att_t = torch.zeros(B, T_T, dtype=torch.long)
    att_t[0, :8], att_t[1, :6] = 1, 1
    batch = {"labels": labels, "teacher_labels": t_labels, "exact_teacher_index": exact,
             "boundary_teacher_index": boundary, "attention_mask": att_s, "teacher_attention_mask": att_t,
             "input_ids": torch.randint(0, V_S, (B, T_S), generator=g),
             "teacher_input_ids": torch.randint(0, V_T, (B, T_T), generator=g)}
    tensors = dict(zs=torch.randn(B, T_S, V_S, generator=g, dtype=dtype), hs=torch.randn(B, T_S, D_S, generator=g, dtype=dtype),
                   zt=3 * torch.randn(B, T_T, V_T, generator=g, dtype=dtype),
                   ht=torch.randn(B, T_T, D_T, generator=g, dtype=dtype),
                   ws=torch.randn(V_S, D_S, generator=g, dtype=dtype), wt=torch.randn(V_T, D_T, generator=g, dtype=dtype))
    tea2stu = torch.full((V_T,), -1, dtype=torch.long)
    tea2stu[:9] = torch.tensor([3, 0, 5, 1, 8, 2, 10, 7, 4])   # 9 shared strings
    return batch, tensors, tea2stu


def pad_batch(batch, tensors, extra=3):
    """Extra padding positions on both sides, filled with garbage values."""
    out = {}
    for k, v in batch.items():
        fill = -100 if "labels" in k else (-1 if "index" in k else 0)
        out[k] = torch.cat([v, torch.full((B, extra), fill, dtype=v.dtype)], 1)
    t = {k: (torch.cat([v, 50 * torch.randn(B, extra, v.shape[-1], dtype=v.dtype)], 1) if k in ("zs", "hs", "zt", "ht")
             else v) for k, v in tensors.items()}
    return out, t


# --------------------------------------------------------------------------- Soft-DTW
def oracle_soft_dtw(C, gamma):
    M, N = C.shape
    R = [[math.inf] * (N + 1) for _ in range(M + 1)]
    R[0][0] = 0.0
    for i in range(1, M + 1):
        for j in range(1, N + 1):
            a = [R[i - 1][j - 1], R[i - 1][j], R[i][j - 1]]
            m = min(a)
            R[i][j] = float(C[i - 1, j - 1]) - gamma * math.log(sum(math.exp(-(x - m) / gamma) for x in a if x < math.inf)) + m
    return R[M][N]


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_soft_dtw_batched_equals_per_example_oracle(gamma):
    torch.manual_seed(0)
    C = torch.rand(4, 6, 9, dtype=DT) * 2
    lr, lc = torch.tensor([6, 3, 1, 5]), torch.tensor([9, 4, 2, 1])
    got = soft_dtw(C, lr, lc, gamma)
    want = [oracle_soft_dtw(C[b, :lr[b], :lc[b]], gamma) for b in range(4)]
    assert got.tolist() == pytest.approx(want, rel=1e-10)


def test_soft_dtw_gradcheck_and_padding_invariance():
    torch.manual_seed(1)
    lr, lc = torch.tensor([3, 2]), torch.tensor([4, 3])
    C = torch.rand(2, 3, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, lr, lc, 0.5), (C,))
    # garbage (huge, inf) beyond the lengths changes neither values nor gradients
    big = torch.full((2, 5, 7), float("inf"), dtype=DT)
    big[:, :3, :4] = C.detach()
    big.requires_grad_(True)
    v1, v2 = soft_dtw(C, lr, lc, 0.5), soft_dtw(big, lr, lc, 0.5)
    assert torch.allclose(v1, v2)
    g1, = torch.autograd.grad(v1.sum(), C)
    g2, = torch.autograd.grad(v2.sum(), big)
    assert torch.isfinite(g2).all() and torch.allclose(g2[:, :3, :4], g1) and g2[:, 3:].abs().sum() == 0


def test_soft_dtw_divergence_is_zero_on_identical_sequences_and_empty_is_zero():
    x = torch.randn(2, 5, 3, dtype=DT)
    n = torch.tensor([5, 2])
    d = soft_dtw_divergence(x, x.clone(), n, n, 0.3, pairwise_cosine_distance)
    assert torch.allclose(d, torch.zeros(2, dtype=DT), atol=1e-9)
    assert soft_dtw(torch.rand(2, 3, 3), torch.tensor([0, 3]), torch.tensor([3, 0]), 1.0).tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- dual_space_kd_v2
def eta_terms(batch, t, tea2stu, t2s, s2t_map, **kw):
    return eta_dual_space_terms(student_logits=t["zs"], student_hidden=t["hs"], teacher_logits=t["zt"],
                                teacher_hidden=t["ht"], labels=batch["labels"], teacher_labels=batch["teacher_labels"],
                                exact_index=batch["exact_teacher_index"], tea2stu=tea2stu, t2s_proj=t2s,
                                s2t_map=s2t_map, student_head_weight=t["ws"], teacher_head_weight=t["wt"], **kw)


def oracle_eta(batch, t, tea2stu, t2s, S, tau=2.0, w_s=None, w_t=None):
    """Per-example, per-pair loop; forward KL at temperature tau, agreement threshold 1.0."""
    ce, kd_all, kd_agree, s2t, n_agree, n = 0.0, 0.0, 0.0, 0.0, 0, 0
    for b in range(B):
        for i in range(T_S):
            j = int(batch["exact_teacher_index"][b, i])
            if j < 0 or batch["labels"][b, i] == -100 or batch["teacher_labels"][b, j] == -100:
                continue
            a = int(tea2stu[int(t["zt"][b, j].argmax())])
            if a < 0:
                continue
            n += 1
            z = t2s(t["ht"][b, j]) @ t["ws"].T
            ce += F.cross_entropy(z[None], torch.tensor([a]), reduction="sum")
            kl = F.kl_div(F.log_softmax(t["zs"][b, i] / tau, -1), F.log_softmax(z.detach() / tau, -1),
                          log_target=True, reduction="sum") * (1.0 if w_s is None else w_s[b, i])
            kd_all += kl
            if int(z.argmax()) == a:
                kd_agree, n_agree = kd_agree + kl, n_agree + 1
            z2 = (t["hs"][b, i] @ S) @ t["wt"].T
            s2t += F.kl_div(F.log_softmax(z2 / tau, -1), F.log_softmax(t["zt"][b, j] / tau, -1),
                            log_target=True, reduction="sum") * (1.0 if w_t is None else w_t[b, j])
    return ce, kd_agree, s2t, n, n_agree


def _projectors(seed=3):
    torch.manual_seed(seed)
    t2s = nn.Linear(D_T, D_S, bias=False).double()
    S = torch.randn(D_S, D_T, dtype=DT)
    return t2s, S


@pytest.mark.parametrize("weighted", [False, True])
def test_eta_terms_equal_the_per_pair_oracle(weighted):
    batch, t, tea2stu = make_batch()
    t2s, S = _projectors()
    w_s = torch.rand(B, T_S, dtype=DT) if weighted else None
    w_t = torch.rand(B, T_T, dtype=DT) if weighted else None
    got = eta_terms(batch, t, tea2stu, t2s, S, temperature=2.0, student_weights=w_s, teacher_weights=w_t)
    ce, kd, s2t, n, n_agree = oracle_eta(batch, t, tea2stu, t2s, S, w_s=w_s, w_t=w_t)
    assert n > 0 and int(got["n_pairs"]) == n and int(got["n_agree"]) == n_agree
    assert float(got["t2s_ce"].detach()) == pytest.approx(float(ce), rel=1e-9)
    assert float(got["t2s_kd"]) == pytest.approx(float(kd), rel=1e-9, abs=1e-12)
    assert float(got["s2t_kd"]) == pytest.approx(float(s2t), rel=1e-9)
    # agreement threshold below the rate: t2s KD over every valid pair
    got_all = eta_terms(batch, t, tea2stu, t2s, S, temperature=2.0, agreement_threshold=-1.0)
    assert int(got_all["n_kd"]) == n


def test_eta_terms_padding_invariance_gradcheck_and_all_masked():
    batch, t, tea2stu = make_batch(seed=4)
    t2s, S = _projectors()
    ref = eta_terms(batch, t, tea2stu, t2s, S)
    pb, pt = pad_batch(batch, t)
    padded = eta_terms(pb, pt, tea2stu, t2s, S)
    for k in ("t2s_ce", "t2s_kd", "s2t_kd", "n_pairs"):
        assert float(padded[k]) == pytest.approx(float(ref[k]), rel=1e-12)
    n_labels = torch.tensor(8)

    def f(zs, hs):
        tt = dict(t, zs=zs, hs=hs)
        return normalize_terms(eta_terms(batch, tt, tea2stu, t2s, S, agreement_threshold=-1.0), n_labels, "aligned")
    zs, hs = t["zs"].clone().requires_grad_(True), t["hs"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (zs, hs))
    masked = dict(batch, labels=torch.full_like(batch["labels"], -100))
    out = eta_terms(masked, dict(t, zs=zs, hs=hs), tea2stu, t2s, S)
    total = normalize_terms(out, torch.tensor(0), "aligned")
    total.backward()
    assert float(total) == 0.0 and torch.isfinite(zs.grad).all() and zs.grad.abs().sum() == 0


# --------------------------------------------------------------------------- uld_hybrid
def test_group_log_scale_matches_a_loop():
    ends = torch.tensor([[0, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]])
    # groups: [0,1] -> -1 ; [2,3,4] -> -7 ; [5] -> 0
    got = group_log_scale(ends, lp)
    assert got[0, 1] == -1.0 and got[0, 4] == -7.0 and got[0, 5] == 0.0


def _shared(tea2stu):
    shared_t = torch.nonzero(tea2stu >= 0).squeeze(1)
    shared_s = tea2stu[shared_t]
    rest = lambda ids, n: torch.tensor([v for v in range(n) if v not in set(ids.tolist())])  # noqa: E731
    return shared_s, shared_t, rest(shared_s, V_S), rest(shared_t, V_T)


def hybrid(batch, t, tea2stu, positions="groups", beta=0.0, skip_last=True):
    s_s, s_t, r_s, r_t = _shared(tea2stu)
    key = "boundary_teacher_index" if positions == "groups" else "exact_teacher_index"
    return uld_hybrid_loss(student_logits=t["zs"], teacher_logits=t["zt"], labels=batch["labels"],
                           teacher_labels=batch["teacher_labels"], index=batch[key], merge=positions == "groups",
                           shared_s=s_s, shared_t=s_t, rest_s=r_s, rest_t=r_t, beta=beta, matched_weight=0.7,
                           unmatched_weight=0.3, skip_last=skip_last)


def oracle_hybrid(batch, t, tea2stu, beta):
    """Per example, per group (GOLD's bayesian merge), explicit formulas."""
    s_s, s_t, r_s, r_t = _shared(tea2stu)
    total = 0.0
    for b in range(B):
        lab_s, lab_t = batch["labels"][b], batch["teacher_labels"][b]
        last_s = max(i for i in range(T_S) if lab_s[i] != -100)
        last_t = max(j for j in range(T_T) if lab_t[j] != -100)
        prev_s = prev_t = None
        for i in range(T_S):
            j = int(batch["boundary_teacher_index"][b, i])
            if j < 0 or lab_s[i] == -100:
                continue
            gs = list(range((prev_s + 1) if prev_s is not None else i, i + 1))
            gt = list(range((prev_t + 1) if prev_t is not None else j, j + 1))
            prev_s, prev_t = i, j
            if i == last_s or j == last_t:
                continue
            ps = F.softmax(t["zs"][b, i], -1) * math.prod(
                float(F.softmax(t["zs"][b, k], -1)[lab_s[k]]) for k in gs[:-1] if lab_s[k] != -100)
            pt = F.softmax(t["zt"][b, j], -1) * math.prod(
                float(F.softmax(t["zt"][b, k], -1)[lab_t[k]]) for k in gt[:-1] if lab_t[k] != -100)
            a, c = ps[s_s].clamp_min(1e-8), pt[s_t].clamp_min(1e-8)
            m = (1 - beta) * a + beta * c
            kl = lambda x, y: float((x * (x.log() - y.log())).sum())  # noqa: E731
            matched = kl(c, a) if beta == 0 else beta * kl(c, m) + (1 - beta) * kl(a, m)
            u_s, u_t = ps[r_s].sort(descending=True).values, pt[r_t].sort(descending=True).values
            L = max(len(u_s), len(u_t))
            u_s, u_t = F.pad(u_s, (0, L - len(u_s))), F.pad(u_t, (0, L - len(u_t)))
            total += 0.7 * matched + 0.3 * float((u_s - u_t).abs().sum())
    return total


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_uld_hybrid_equals_the_per_group_oracle(beta):
    batch, t, tea2stu = make_batch(seed=5)
    got = hybrid(batch, t, tea2stu, beta=beta)
    assert int(got["n_pairs"]) == 5      # 4 + 3 group pairs minus the two at the last labels
    assert float(got["kd"]) == pytest.approx(oracle_hybrid(batch, t, tea2stu, beta), rel=1e-9)


def test_uld_hybrid_padding_gradcheck_all_masked_and_zero_on_identical():
    batch, t, tea2stu = make_batch(seed=6)
    ref = hybrid(batch, t, tea2stu)
    pb, pt = pad_batch(batch, t)
    assert float(hybrid(pb, pt, tea2stu)["kd"]) == pytest.approx(float(ref["kd"]), rel=1e-12)
    zs = t["zs"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: hybrid(batch, dict(t, zs=z), tea2stu, beta=0.5)["kd"], (zs,))
    masked = dict(batch, labels=torch.full_like(batch["labels"], -100))
    out = hybrid(masked, dict(t, zs=zs), tea2stu)["kd"]
    out.backward()
    assert float(out) == 0.0 and torch.isfinite(zs.grad).all()
    # one shared vocabulary in identical order and identical logits: the loss is 0
    same = torch.arange(V_S)
    ident = dict(t, zt=t["zs"].clone()[:, :T_S].contiguous())
    b2 = dict(batch, teacher_labels=batch["labels"], exact_teacher_index=torch.where(
        batch["labels"] != -100, torch.arange(T_S).expand(B, -1), -1))
    b2["boundary_teacher_index"] = b2["exact_teacher_index"]
    out = uld_hybrid_loss(student_logits=ident["zs"], teacher_logits=ident["zt"], labels=b2["labels"],
                          teacher_labels=b2["teacher_labels"], index=b2["exact_teacher_index"], merge=False,
                          shared_s=same, shared_t=same, rest_s=same[:0], rest_t=same[:0], beta=0.0,
                          matched_weight=1.0, unmatched_weight=0.0)
    assert float(out["kd"]) == pytest.approx(0.0, abs=1e-12) and int(out["n_pairs"]) > 0


def test_uld_hybrid_criterion_adaptive_weights_and_errors():
    _, _, tea2stu = make_batch()
    crit = ULDHybrid(tea2stu, V_S)
    assert crit.matched_weight == pytest.approx(9 / V_T) and crit.unmatched_weight == pytest.approx(1 - 9 / V_T)
    with pytest.raises(ValueError, match="together"):
        ULDHybrid(tea2stu, V_S, matched_weight=0.5)
    with pytest.raises(ValueError, match="uld-hybrid-positions"):
        ULDHybrid(tea2stu, V_S, positions="all")


def test_shared_vocab_map_is_one_to_one_across_notations():
    teacher = ["▁the", "the", "▁a", "<0x0A>", "x", "▁the"]      # SentencePiece
    student = ["Ġthe", "the", "Ċ", "y", "Ġa"] + [chr(c) for c in range(33, 127)]   # byte-level-ish
    m = build_shared_vocab_map(teacher, student)
    assert m[1] == 1 and m[4] == student.index("x")
    assert m[5] == -1 or m[5] != m[0]      # a repeated string is matched once
    assert len([v for v in m if v >= 0]) == len({v for v in m if v >= 0})


# --------------------------------------------------------------------------- dwa_kd
def test_dual_space_weights_have_mean_one_and_follow_entropy():
    batch, t, _ = make_batch(seed=7)
    w_s, w_t = dual_space_weights(t["zs"], t["zt"], batch["labels"], batch["teacher_labels"])
    for w, lab in ((w_s, batch["labels"]), (w_t, batch["teacher_labels"])):
        m = lab != -100
        assert torch.allclose((w * m).sum(1) / m.sum(1), torch.ones(B, dtype=w.dtype))
        assert (w[~m] == 0).all()
    # per-position oracle: student entropy, teacher 1 - H / log V
    b, i = 0, 3
    p = F.softmax(t["zs"][b, i], -1)
    h = -(p * p.log()).sum()
    hs = torch.stack([-(F.softmax(t["zs"][b, k], -1) * F.log_softmax(t["zs"][b, k], -1)).sum() for k in range(2, 7)])
    assert float(w_s[b, i]) == pytest.approx(float(h / hs.mean()), rel=1e-9)


def test_response_sequences_and_dtw_terms_batched_equal_per_example():
    batch, t, _ = make_batch(seed=8)
    seq, n = response_sequences(t["hs"], batch["labels"])
    assert n.tolist() == [5, 3] and torch.equal(seq[1, :3], t["hs"][1, 1:4])
    torch.manual_seed(0)
    emb_s, emb_t = nn.Embedding(V_S, D_S).double(), nn.Embedding(V_T, D_T).double()
    pe, ph = nn.Linear(D_T, D_S).double(), nn.Linear(D_T, D_S).double()
    kw = dict(student_embed=emb_s, teacher_embed=emb_t, embed_proj=pe, hidden_proj=ph, gamma=0.5)
    e, h = dtw_terms(student_hidden=t["hs"], teacher_hidden=t["ht"], labels=batch["labels"],
                     teacher_labels=batch["teacher_labels"], **kw)
    for b in range(B):
        ms, mt = batch["labels"][b] != -100, batch["teacher_labels"][b] != -100
        xs, xt = t["hs"][b][ms][None], ph(t["ht"][b][mt])[None]
        one = soft_dtw_divergence(xs, xt, torch.tensor([xs.shape[1]]), torch.tensor([xt.shape[1]]), 0.5,
                                  pairwise_cosine_distance)
        assert float(h[b]) == pytest.approx(float(one[0]), rel=1e-9)
    pb, pt = pad_batch(batch, t)
    e2, h2 = dtw_terms(student_hidden=pt["hs"], teacher_hidden=pt["ht"], labels=pb["labels"],
                       teacher_labels=pb["teacher_labels"], **kw)
    assert torch.allclose(e, e2) and torch.allclose(h, h2)


def _views(t, requires_grad=True):
    torch.manual_seed(0)
    emb_s, emb_t = nn.Embedding(V_S, D_S).double(), nn.Embedding(V_T, D_T).double()
    head_s, head_t = nn.Linear(D_S, V_S, bias=False).double(), nn.Linear(D_T, V_T, bias=False).double()
    zs, hs = t["zs"].clone().requires_grad_(requires_grad), t["hs"].clone().requires_grad_(requires_grad)
    return (ModelView(zs, hs, emb_s, head_s), ModelView(t["zt"], t["ht"], emb_t, head_t))


def test_dwa_kd_criterion_all_masked_is_a_finite_zero_and_padding_invariant():
    batch, t, _ = make_batch(seed=9)
    crit = DWAKD(D_S, D_T, gamma=0.5).double()
    s, te = _views(t)
    out = crit(batch, s, te)
    assert torch.isfinite(out.loss_sum) and float(out.metrics["dtw_loss"]) != 0.0
    pb, pt = pad_batch(batch, t)
    s2, te2 = _views(pt)
    assert float(crit(pb, s2, te2).loss_sum) == pytest.approx(float(out.loss_sum), rel=1e-9)
    masked = dict(batch, labels=torch.full_like(batch["labels"], -100),
                  teacher_labels=torch.full_like(batch["teacher_labels"], -100))
    s3, te3 = _views(t)
    out = crit(masked, s3, te3)
    out.loss_sum.backward()
    assert float(out.loss_sum) == 0.0 and int(out.n_tokens) == 0
    assert torch.isfinite(s3.logits.grad).all() and torch.isfinite(s3.hidden.grad).all()


# --------------------------------------------------------------------------- MCW-KD's direct KL
def test_exact_vocab_kl_equals_a_per_pair_oracle_and_pads_invariantly():
    from mckd.criteria.exact_kl import exact_vocab_kl

    batch, t, tea2stu = make_batch(seed=10)
    s_s, s_t, _, _ = _shared(tea2stu)
    zs = t["zs"].clone().requires_grad_(True)
    got, n = exact_vocab_kl(zs, t["zt"], batch["labels"], batch["teacher_labels"], batch["exact_teacher_index"],
                            s_s, s_t, temperature=2.0)
    want, count = 0.0, 0
    for b in range(B):
        for i in range(T_S):
            j = int(batch["exact_teacher_index"][b, i])
            if j < 0 or batch["labels"][b, i] == -100 or batch["teacher_labels"][b, j] == -100:
                continue
            w = F.softmax(t["zt"][b, j, s_t] / 2.0, -1)
            lp = F.log_softmax(t["zs"][b, i] / 2.0, -1)[s_s]
            want, count = want + float((w * (w.log() - lp)).sum()), count + 1
    assert int(n) == count == 5 and float(got.detach()) == pytest.approx(want, rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda z: exact_vocab_kl(z, t["zt"], batch["labels"], batch["teacher_labels"],
                                 batch["exact_teacher_index"], s_s, s_t)[0], (zs,))
    pb, pt = pad_batch(batch, t)
    padded, _ = exact_vocab_kl(pt["zs"], pt["zt"], pb["labels"], pb["teacher_labels"], pb["exact_teacher_index"],
                               s_s, s_t, temperature=2.0)
    assert float(padded) == pytest.approx(want, rel=1e-10)
