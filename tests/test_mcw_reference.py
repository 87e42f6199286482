"""The ``reference`` preset of mcw_kd reproduces the published OT formulas (a per-example loop oracle of those formulas)."""
from __future__ import annotations

import pytest
import torch

from mckd.criteria.base import ModelView
from mckd.criteria.mcw.criterion import MCWKD
from mckd.criteria.mcw.presets import preset
from mckd.criteria.mcw.weights import simplex_qp_weights
from mckd.data.batch import IGNORE_INDEX
from mcw_reference_oracle import published_ot_hidden, published_ot_logits, published_qp, qp_objective

D_S, D_T, V_S, V_T = 8, 12, 50, 60


def make_inputs(B=3, T_s=10, T_t=12, seed=0, dtype=torch.float32):
    """Random model outputs and a batch with right padding, prompts, offsets and DTW pairs."""
    g = torch.Generator().manual_seed(seed)
    len_s = torch.tensor([T_s, T_s - 3, T_s - 1][:B])
    len_t = torch.tensor([T_t, T_t - 2, T_t - 4][:B])
    prompt_s, prompt_t = torch.tensor([3, 2, 4][:B]), torch.tensor([4, 3, 2][:B])
    att_s = (torch.arange(T_s)[None] < len_s[:, None]).long()
    att_t = (torch.arange(T_t)[None] < len_t[:, None]).long()
    labels = torch.randint(0, V_S, (B, T_s), generator=g)
    labels[(torch.arange(T_s)[None] < prompt_s[:, None]) | (att_s == 0)] = IGNORE_INDEX
    t_labels = torch.randint(0, V_T, (B, T_t), generator=g)
    t_labels[(torch.arange(T_t)[None] < prompt_t[:, None]) | (att_t == 0)] = IGNORE_INDEX

    def offsets(lengths, T, width):
        starts = (torch.arange(T)[None] * width).expand(len(lengths), -1)
        off = torch.stack([starts, starts + width], -1)
        off[torch.arange(T)[None].expand(len(lengths), -1) >= lengths[:, None]] = 0
        return off

    # Dense DTW costs (teacher rows, student columns) with zeros off a random monotone path.
    P = T_s + T_t
    dtw_index = torch.zeros(B, P, 2, dtype=torch.long)
    dtw_value = torch.zeros(B, P)
    dtw_mask = torch.zeros(B, P, dtype=torch.bool)
    dense = []
    for b in range(B):
        i = j = n = 0
        pairs = [(0, 0)]
        while (i, j) != (int(len_t[b]) - 1, int(len_s[b]) - 1):
            step = torch.randint(0, 3, (1,), generator=g).item()
            i = min(i + (step != 1), int(len_t[b]) - 1)
            j = min(j + (step != 0), int(len_s[b]) - 1)
            pairs.append((i, j))
        d = torch.zeros(int(len_t[b]), int(len_s[b]), dtype=dtype)
        for n, (i, j) in enumerate(pairs):
            v = torch.randint(0, 5, (1,), generator=g).item() * 0.5
            dtw_index[b, n] = torch.tensor([i, j])
            dtw_value[b, n] = v
            dtw_mask[b, n] = True
            d[i, j] += v
        dense.append(d)
    batch = dict(input_ids=torch.randint(0, V_S, (B, T_s), generator=g) * att_s, attention_mask=att_s, labels=labels,
                 offsets=offsets(len_s, T_s, 3), teacher_input_ids=torch.randint(0, V_T, (B, T_t), generator=g) * att_t,
                 teacher_attention_mask=att_t, teacher_labels=t_labels,
                 teacher_offsets=offsets(len_t, T_t, 2), dtw_index=dtw_index, dtw_value=dtw_value, dtw_mask=dtw_mask)
    s_logits = (torch.randn(B, T_s, V_S, generator=g) * 3).to(dtype).requires_grad_()
    t_logits = (torch.randn(B, T_t, V_T, generator=g) * 3).to(dtype)
    h_s = torch.randn(B, T_s, D_S, generator=g).to(dtype).requires_grad_()
    h_t = torch.randn(B, T_t, D_T, generator=g).to(dtype)
    return batch, s_logits, t_logits, h_s, h_t, dense


def views(s_logits, t_logits, h_s, h_t):
    dummy = torch.nn.Identity()
    return ModelView(s_logits, h_s, dummy, dummy), ModelView(t_logits, h_t, dummy, dummy)


@pytest.mark.parametrize("T_s,T_t", [(10, 12), (12, 12), (13, 9)])
def test_reference_preset_matches_published_loop_oracle(T_s, T_t):
    torch.manual_seed(0)
    batch, s_logits, t_logits, h_s, h_t, dense = make_inputs(T_s=T_s, T_t=T_t)
    crit = MCWKD(D_S, D_T, kd_rate=0.0, options=preset("reference", top_k=20))
    crit.set_progress(7, 20)
    t = 0.1 + 0.9 * 7 / 20
    student, teacher = views(s_logits, t_logits, h_s, h_t)
    out = crit.ot_terms(batch, student, teacher)
    s_mask, t_mask = batch["attention_mask"].bool(), batch["teacher_attention_mask"].bool()
    ref_l, per_l = published_ot_logits(s_logits, t_logits, h_s, h_t, s_mask, t_mask, crit.ot_projector,
                                       crit.salience_head, (0.2, 0.5, 0.3), k=20, t=t)
    ref_h, per_h = published_ot_hidden(h_s, h_t, s_mask, t_mask, crit.ot_projector, dense, (0.3, 0.5, 0.2))
    torch.testing.assert_close(out["ot_logits"], torch.stack(per_l), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["ot_hidden"], torch.stack(per_h), rtol=1e-4, atol=1e-6)
    # Published scaling: the mean over examples is what enters the token-summed loss.
    torch.testing.assert_close(crit.scale_ot(out["ot_logits"], batch["labels"]), ref_l, rtol=1e-4, atol=1e-6)
    # Gradients through the 100 unrolled iterations agree too.
    params = [s_logits, h_s, crit.salience_head.weight, next(crit.ot_projector.parameters())]
    ours = torch.autograd.grad(out["ot_logits"].sum() + out["ot_hidden"].sum(), params)
    theirs = torch.autograd.grad(sum(per_l) + sum(per_h), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_reference_published_regime_is_near_uniform_plan():
    """Spec 7.5: with eps = 10 the plan is within a few percent of the product coupling."""
    batch, s_logits, t_logits, h_s, h_t, _ = make_inputs()
    crit = MCWKD(D_S, D_T, kd_rate=0.0, options=preset("reference", top_k=20))
    out = crit.ot_terms(batch, *views(s_logits, t_logits, h_s, h_t))
    t_mask, s_mask = out["masks"]
    uniform = (t_mask.float()[:, :, None] / t_mask.sum(1)[:, None, None]) * (s_mask.float()[:, None, :] / s_mask.sum(1)[:, None, None])
    ratio = out["plan_logits"][uniform > 0] / uniform[uniform > 0]
    assert 0.8 < ratio.min() and ratio.max() < 1.25
    sharp = MCWKD(D_S, D_T, kd_rate=0.0, options=preset("default", top_k=20))
    sharp.load_state_dict(crit.state_dict())
    out2 = sharp.ot_terms(batch, *views(s_logits, t_logits, h_s, h_t))
    t2, s2 = out2["masks"]
    u2 = (t2.float()[:, :, None] / t2.sum(1).clamp_min(1)[:, None, None]) * (s2.float()[:, None, :] / s2.sum(1).clamp_min(1)[:, None, None])
    assert (out2["plan_logits"][u2 > 0] / u2[u2 > 0]).max() > 3  # the default preset really transports


@pytest.mark.parametrize("c", [(0.1, 1.5, 0.1), (0.2, 0.3, 0.25), (0.05, 0.4, 0.3), (0.02, 3.0, 0.1), (5.0, 0.0, 0.0)])
def test_closed_form_qp_matches_numerical_solution(c):
    closed = simplex_qp_weights(torch.tensor(c, dtype=torch.float64), sigma=2.0, floor=0.01)
    torch.testing.assert_close(closed, published_qp(c), atol=1e-9, rtol=0)
    # ... and no feasible point does better.
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.rand(3, generator=g, dtype=torch.float64)
        x = 0.01 + (1 - 0.03) * x / x.sum()
        assert qp_objective(x, c) >= qp_objective(closed, c) - 1e-12


def test_spec_qp_examples():
    got = simplex_qp_weights(torch.tensor([[0.1, 1.5, 0.1], [0.02, 3.0, 0.1]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[0.45, 0.10, 0.45], [0.505, 0.01, 0.485]], dtype=torch.float64),
                               atol=1e-9, rtol=0)
