"""mcw_kd criterion: the test battery (random tensors), cost weights, schedule, state and CLI."""
from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from mckd.criteria import get_criterion_class
from mckd.criteria.base import ModelDims, ModelView
from mckd.criteria.mcw.criterion import MCWKD
from mckd.criteria.mcw.ot import cost_statistics, interpolation_weight
from mckd.criteria.mcw.presets import DEFAULT, REFERENCE, MCWOptions, add_mcw_args, options_from_values, preset
from mckd.criteria.mcw.weights import simplex_qp_weights
from mckd.ot.costs import context_mean, pairwise_kl, span_iou_cost
from test_mcw_reference import D_S, D_T, V_S, V_T, make_inputs
from mcw_reference_oracle import context_loop


def full_views(s_logits, t_logits, h_s, h_t, seed=0):
    torch.manual_seed(seed)
    return (ModelView(s_logits, h_s, nn.Embedding(V_S, D_S), nn.Linear(D_S, V_S, bias=False)),
            ModelView(t_logits, h_t, nn.Embedding(V_T, D_T), nn.Linear(D_T, V_T, bias=False)))


def criterion(name="default", kd_rate=0.5, **over):
    torch.manual_seed(0)
    over.setdefault("top_k", 20)
    return MCWKD(D_S, D_T, options=preset(name, **over), kd_rate=kd_rate, normalization="token_rms")


def slice_batch(batch, i):
    return {k: v[i:i + 1] for k, v in batch.items()}


# ---------------------------------------------------------------------------- cost pieces
def test_context_mean_matches_loop_on_contiguous_blocks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 3, generator=g)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, :7] = True      # right padding
    mask[1, 3:9] = True     # response span in the middle
    out = context_mean(x, mask, 4)
    for b in range(2):
        idx = mask[b].nonzero().squeeze(1)
        torch.testing.assert_close(out[b, idx], context_loop(x[b, idx], 4))
        assert (out[b, ~mask[b]] == 0).all()


def test_kl_cost_gemm_equals_explicit_tensor():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 5, 7, generator=g), -1)
    q = torch.softmax(torch.randn(2, 4, 7, generator=g), -1)
    explicit = (p[:, :, None] * (p[:, :, None].log() - (q[:, None] + 1e-7).log())).sum(-1)
    torch.testing.assert_close(pairwise_kl(p, q), explicit, rtol=1e-5, atol=1e-6)


def test_span_iou_cost():
    t = torch.tensor([[[0, 4], [4, 6], [0, 0]]])
    s = torch.tensor([[[0, 2], [2, 6]]])
    c = span_iou_cost(t, s)
    torch.testing.assert_close(c, torch.tensor([[[1 - 2 / 4, 1 - 2 / 6], [1.0, 1 - 2 / 4], [1.0, 1.0]]]))


def test_interpolation_counts_optimizer_steps():
    assert interpolation_weight(0, 100, 0.1) == pytest.approx(0.1)
    assert interpolation_weight(50, 100, 0.1) == pytest.approx(0.55)
    assert interpolation_weight(500, 100, 0.1) == pytest.approx(1.0)
    crit = criterion()
    crit.set_progress(25, 100)
    t1 = crit.interpolation_t()
    # Micro-batches of one optimizer step do not advance the schedule.
    batch, s, t, hs, ht, _ = make_inputs()
    for _ in range(3):
        crit(batch, *full_views(s, t, hs, ht))
    assert crit.interpolation_t() == t1 == pytest.approx(0.1 + 0.9 * 0.25)


# ---------------------------------------------------------------------------- battery
@pytest.mark.parametrize("name", ["default", "reference"])
def test_forward_finite_and_every_trainable_part_gets_gradient(name):
    batch, s, t, hs, ht, _ = make_inputs()
    crit = criterion(name)
    out = crit(batch, *full_views(s, t, hs, ht))
    assert torch.isfinite(out.loss_sum) and out.n_tokens == (batch["labels"] != -100).sum()
    out.loss_sum.backward()
    for pname, p in crit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname   # the salience head and every projector really learn
    assert torch.isfinite(s.grad).all() and torch.isfinite(hs.grad).all()
    for k in ("ot_logits", "ot_hidden", "kd_loss", "nll_loss", "stat/interp_t", "stat/w_logits_kl"):
        assert k in out.metrics


def test_loss_decomposition_and_per_token_scaling():
    batch, s, t, hs, ht, _ = make_inputs()
    crit = criterion("default", kd_rate=0.0, w_logits=0.7, w_hidden=0.3)
    out = crit(batch, *full_views(s, t, hs, ht))
    ot = crit.ot_terms(batch, *full_views(s, t, hs, ht))
    n_b = (batch["labels"] != -100).sum(1).float()
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, V_S), batch["labels"].reshape(-1), reduction="sum")
    expect = ce + 0.7 * (ot["ot_logits"] * n_b).sum() + 0.3 * (ot["ot_hidden"] * n_b).sum()
    torch.testing.assert_close(out.loss_sum, expect, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_loss():
    batch, s, t, hs, ht, _ = make_inputs()
    crit = criterion("default")
    ref = crit(batch, *full_views(s, t, hs, ht)).loss_sum
    pad_s, pad_t = 3, 2

    def pad(x, n, value=0):
        shape = list(x.shape)
        shape[1] = n
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], 1)

    big = dict(batch)
    for k in ("input_ids", "attention_mask", "offsets"):
        big[k] = pad(batch[k], pad_s)
    big["labels"] = pad(batch["labels"], pad_s, -100)
    for k in ("teacher_input_ids", "teacher_attention_mask", "teacher_offsets"):
        big[k] = pad(batch[k], pad_t)
    big["teacher_labels"] = pad(batch["teacher_labels"], pad_t, -100)
    views = full_views(pad(s.detach(), pad_s, 5.0), pad(t, pad_t, -3.0), pad(hs.detach(), pad_s, 9.0),
                       pad(ht, pad_t, 7.0))
    torch.testing.assert_close(crit(big, *views).loss_sum, ref, rtol=1e-4, atol=1e-4)


def test_batched_equals_per_example_loop():
    batch, s, t, hs, ht, _ = make_inputs()
    crit = criterion("default")   # token_rms CMA normalisation: no batch-wide statistic
    views = full_views(s, t, hs, ht)
    total = crit(batch, *views).loss_sum
    parts = [crit(slice_batch(batch, i), *full_views(s[i:i + 1], t[i:i + 1], hs[i:i + 1], ht[i:i + 1]))
             for i in range(3)]
    torch.testing.assert_close(total, sum(p.loss_sum for p in parts), rtol=1e-4, atol=1e-4)


def test_all_masked_gives_finite_ot_zero_with_gradients():
    batch, s, t, hs, ht, _ = make_inputs()
    batch = dict(batch, labels=torch.full_like(batch["labels"], -100),
                 teacher_labels=torch.full_like(batch["teacher_labels"], -100))
    crit = criterion("default")
    out = crit(batch, *full_views(s, t, hs, ht))
    assert out.n_tokens == 0 and torch.isfinite(out.loss_sum)
    assert out.metrics["ot_logits"] == 0 and out.metrics["ot_hidden"] == 0
    out.loss_sum.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(hs.grad).all()


def test_detached_interpolation_stops_gradient_through_target():
    batch, s, t, hs, ht, _ = make_inputs()
    for detach in (True, False):
        crit = criterion("default", kd_rate=0.0, interp_detach=detach)
        crit.set_progress(0, 10)
        ot = crit.ot_terms(batch, *full_views(s, t, hs, ht))
        # Only the L2 and KL costs see the logits; compare the gradient of the plan-weighted KL cost.
        (g,) = torch.autograd.grad((ot["plan_logits"] * ot["logit_costs"][1]).sum(), s)
        if detach:
            g_detached = g
        else:
            assert not torch.allclose(g, g_detached)


def test_missing_alignment_keys_raise_clear_error():
    batch, s, t, hs, ht, _ = make_inputs()
    del batch["dtw_index"]
    with pytest.raises(KeyError, match="dtw_index"):
        criterion("reference")(batch, *full_views(s, t, hs, ht))


# ---------------------------------------------------------------------------- weights and state
def test_weight_update_every_interval_uses_closed_form_qp_and_rank_mean():
    batch, s, t, hs, ht, _ = make_inputs()
    crit = criterion("default", update_interval=2, weight_momentum=0.5, kd_rate=0.0, interp_start=1.0)
    views = full_views(s, t, hs, ht)
    seen = []

    def all_reduce_mean(x):
        seen.append(x.clone())
        return x * 1.0  # one rank

    old = crit.weights_logits.clone()
    crit.set_progress(0, 10)
    crit(batch, *views)
    assert crit.after_optimizer_step(all_reduce_mean) == {} and not seen     # step 1: no update
    crit.set_progress(1, 10)
    crit(batch, *views)
    ot = crit.ot_terms(batch, *views)
    t_mask, s_mask = ot["masks"]
    sums, count = cost_statistics(ot["logit_costs"], ot["plan_logits"], t_mask, s_mask, "plan_ratio")
    logged = crit.after_optimizer_step(all_reduce_mean)
    expect = 0.5 * old + 0.5 * simplex_qp_weights(sums / count, sigma=2.0, floor=0.01)
    torch.testing.assert_close(crit.weights_logits, expect, rtol=1e-4, atol=1e-5)
    assert abs(crit.weights_logits.sum().item() - 1) < 1e-5 and (crit.weights_logits >= 0.01 - 1e-6).all()
    assert len(seen) == 2 and "mcw/w_logits_kl" in logged
    # The accumulators restart after an update.
    assert crit._stat_sum is None


def test_state_dict_restores_weights_salience_and_schedule():
    batch, s, t, hs, ht, _ = make_inputs()
    crit = criterion("default", update_interval=1)
    crit.set_progress(6, 10)
    crit(batch, *full_views(s, t, hs, ht))
    crit.after_optimizer_step(lambda x: x)
    with torch.no_grad():
        crit.salience_head.weight.add_(1.0)
    state = crit.state_dict()
    assert {"weights_logits", "weights_hidden", "progress", "salience_head.weight", "projectors.ot.0.weight"} <= set(state)
    fresh = MCWKD(D_S, D_T, options=preset("default", top_k=20, update_interval=1), normalization="token_rms")
    assert not torch.equal(fresh.weights_logits, crit.weights_logits)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weights_logits, crit.weights_logits)
    assert torch.equal(fresh.weights_hidden, crit.weights_hidden)
    assert torch.equal(fresh.salience_head.weight, crit.salience_head.weight)
    assert (fresh.step, fresh.total_steps) == (6, 10) and fresh.interpolation_t() == crit.interpolation_t()


# ---------------------------------------------------------------------------- CLI
def _parse(argv):
    p = argparse.ArgumentParser()
    add_mcw_args(p)
    return vars(p.parse_args(argv))


def test_presets_and_flag_overrides():
    assert options_from_values(_parse([])) == DEFAULT
    assert options_from_values(_parse(["--mcw-preset", "reference"])) == REFERENCE
    o = options_from_values(_parse(["--mcw-preset", "reference", "--top_k_vocab", "300", "--mcw-sinkhorn-iters", "7",
                                    "--mcw-interp-detach", "true", "--mcw-weights-logits", "0.5", "0.25", "0.25"]))
    assert (o.top_k, o.sinkhorn_iters, o.interp_detach, o.weights_logits) == (300, 7, True, (0.5, 0.25, 0.25))
    assert o.epsilon == REFERENCE.epsilon and o.positions == "attention"
    with pytest.raises(ValueError, match="--mcw-weights-logits"):
        options_from_values(_parse(["--mcw-weights-logits", "0.5", "0.5", "0.5"]))
    with pytest.raises(ValueError, match="--mcw-positions"):
        options_from_values(_parse(["--mcw-positions", "everything"]))
    # the saved record (args.json) reads back to the same options whatever the preset
    assert MCWOptions.from_values(o.values()) == o
    assert MCWOptions.from_values({**o.values(), "mcw_preset": "default"}) == o


def test_registry_and_from_options(tmp_path):
    from mckd.criteria.options import CriterionOptions

    cls = get_criterion_class("mcw_kd")
    assert cls is MCWKD and cls.needs_teacher and cls.needs_hidden and "dtw" in cls.alignment
    p = argparse.ArgumentParser()
    for group in cls.option_groups:
        group.add_args(p)
    values = vars(p.parse_args(["--kd-rate", "5.0", "--mcw-preset", "default", "--mcw-top-k", "16"]))
    crit = cls.from_options(CriterionOptions.from_values(values, cls.option_groups),
                            ModelDims(D_S, V_S, D_T, V_T), None)
    assert crit.kd_rate == 5.0 and crit.options.top_k == 16 and crit.alignment == ()
    assert set(crit.projectors) == {"ot", "query", "t2s", "s2t"}
