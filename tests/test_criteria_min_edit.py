"""min_edit_dis_kld: the criterion battery (STYLE.md item 9) against a per-position loop oracle
written from the published MinED formulas, plus construction from the CLI options."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mckd.criteria import ModelDims, ModelView, get_criterion_class
from mckd.criteria.base import CriterionResources
from mckd.criteria.common import label_mask
from mckd.criteria.divergences import forward_kl
from mckd.criteria.min_edit_dis_kld import (FILL_LOGIT, GOLD_LOGIT, MinEditDisKLD, dense_target_logits,
                                            invert_vocab_map, mined_kd_per_token, mined_transfer)


def view(logits: torch.Tensor) -> ModelView:
    return ModelView(logits=logits, hidden=None, embed_tokens=nn.Identity(), lm_head=nn.Identity())


# --------------------------------------------------------------------------- oracle (published MinED formulas)
def oracle_loss(student_logits, teacher_logits, batch, tea2stu, kd_rate, tau, tau_squared=False,
                combination="interpolate"):
    """Per-example, per-position loop: the published algorithm written plainly."""
    V_s = student_logits.shape[-1]
    stu2tea = {}
    for t, s in enumerate(tea2stu):            # student id -> teacher ids ascending, keep the first
        stu2tea.setdefault(s, t)
    ce_sum = student_logits.new_zeros(())
    kd_sum = student_logits.new_zeros(())
    for b in range(student_logits.shape[0]):
        for j in range(student_logits.shape[1]):
            y = int(batch["labels"][b, j])
            if y == -100:
                continue
            z = student_logits[b, j]
            ce_sum = ce_sum - torch.log_softmax(z, -1)[y]
            i = int(batch["mined_teacher_index"][b, j])
            row = None
            if i >= 0 and int(batch["input_ids"][b, j]) == tea2stu[int(batch["teacher_input_ids"][b, i])]:
                row = torch.full((V_s,), FILL_LOGIT, dtype=z.dtype)
                for s, t in stu2tea.items():
                    row[s] = teacher_logits[b, i, t]
                if row.max() == FILL_LOGIT:
                    row = None
            if row is None:
                row = torch.full((V_s,), FILL_LOGIT, dtype=z.dtype)
                row[y] = GOLD_LOGIT
            q = torch.softmax(row / tau, -1)
            kl = (q * (torch.log_softmax(row / tau, -1) - torch.log_softmax(z / tau, -1))).sum()
            kd_sum = kd_sum + (kl * tau ** 2 if tau_squared else kl)
    if combination == "interpolate":
        return (1 - kd_rate) * ce_sum + kd_rate * kd_sum
    return ce_sum + kd_rate * kd_sum


def random_case(seed=0, B=3, T_s=7, T_t=9, V_s=11, V_t=17, dtype=torch.float32):
    """A batch with many-to-one maps, unmapped student ids, right padding and -1 alignments."""
    g = torch.Generator().manual_seed(seed)
    tea2stu = torch.randint(0, V_s - 2, (V_t - 3,), generator=g).tolist()  # ids V_s-2.. unmapped
    teacher_ids = torch.randint(0, V_t - 3, (B, T_t), generator=g)
    lengths = [max(2, T_s - 2 * b) for b in range(B)]
    labels = torch.randint(0, V_s, (B, T_s), generator=g)
    index = torch.randint(0, T_t, (B, T_s), generator=g)
    index[torch.rand(B, T_s, generator=g) < 0.2] = -1
    input_ids = torch.randint(0, V_s, (B, T_s), generator=g)
    # make about two thirds of the aligned positions pass condition (b)
    agree = torch.rand(B, T_s, generator=g) < 0.66
    mapped = torch.tensor(tea2stu)[teacher_ids.gather(1, index.clamp_min(0))]
    input_ids = torch.where(agree, mapped, input_ids)
    for b, n in enumerate(lengths):
        labels[b, :1] = -100                    # a prompt position
        labels[b, n:] = -100
        index[b, n:] = -1
    index[labels.eq(-100)] = -1
    batch = {"input_ids": input_ids, "labels": labels, "teacher_input_ids": teacher_ids,
             "mined_teacher_index": index}
    s_logits = torch.randn(B, T_s, V_s, generator=g, dtype=dtype) * 2
    t_logits = torch.randn(B, T_t, V_t, generator=g, dtype=dtype) * 2
    return batch, s_logits, t_logits, tea2stu


# --------------------------------------------------------------------------- pieces
def test_invert_vocab_map_keeps_the_first_teacher_id():
    t_ids, s_ids = invert_vocab_map(torch.tensor([2, 0, 2, 1, 0]), student_vocab=4)
    assert s_ids.tolist() == [0, 1, 2] and t_ids.tolist() == [1, 3, 0]   # student 3 unmapped


def test_hand_computed_value():
    # V_s = 2, identity map; student uniform, teacher logits (log 3, 0) -> q = (3/4, 1/4)
    crit = MinEditDisKLD([0, 1], student_vocab=2, kd_rate=0.5)
    batch = {"input_ids": torch.tensor([[1]]), "labels": torch.tensor([[0]]),
             "teacher_input_ids": torch.tensor([[1]]), "mined_teacher_index": torch.tensor([[0]])}
    s = torch.zeros(1, 1, 2)
    t = torch.tensor([[[math.log(3.0), 0.0]]])
    loss, n, metrics = crit(batch, view(s), view(t))
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert n.item() == 1 and metrics["aligned_fraction"].item() == 1
    assert loss.item() == pytest.approx(0.5 * math.log(2.0) + 0.5 * kl, rel=1e-6)


def test_transfer_targets_match_the_spec():
    batch, s, t, tea2stu = random_case(seed=1)
    tea2stu_t = torch.tensor(tea2stu)
    t_ids, s_ids = invert_vocab_map(tea2stu_t, s.shape[-1])
    cols, aligned = mined_transfer(t, batch["mined_teacher_index"], batch["input_ids"],
                                   batch["teacher_input_ids"], batch["labels"], tea2stu_t, t_ids)
    target = dense_target_logits(cols, aligned, batch["labels"], s_ids, s.shape[-1])
    assert aligned.any() and (~aligned & batch["labels"].ne(-100)).any()   # both kinds occur
    b, j = aligned.nonzero()[0].tolist()
    i = batch["mined_teacher_index"][b, j]
    expected = torch.full((s.shape[-1],), FILL_LOGIT)
    expected[s_ids] = t[b, i, t_ids]
    assert torch.equal(target[b, j], expected)
    b, j = (~aligned & batch["labels"].ne(-100)).nonzero()[0].tolist()
    onehot = torch.full((s.shape[-1],), FILL_LOGIT)
    onehot[batch["labels"][b, j]] = GOLD_LOGIT
    assert torch.equal(target[b, j], onehot)


@pytest.mark.parametrize("tau,tau_sq", [(1.0, False), (2.0, True), (0.5, False)])
def test_sparse_kl_equals_the_shared_forward_kl_on_the_dense_target(tau, tau_sq):
    batch, s, t, tea2stu = random_case(seed=9)
    tea2stu_t = torch.tensor(tea2stu)
    t_ids, s_ids = invert_vocab_map(tea2stu_t, s.shape[-1])
    cols, aligned = mined_transfer(t, batch["mined_teacher_index"], batch["input_ids"],
                                   batch["teacher_input_ids"], batch["labels"], tea2stu_t, t_ids)
    dense = dense_target_logits(cols, aligned, batch["labels"], s_ids, s.shape[-1])
    mask = label_mask(batch["labels"])
    ours = mined_kd_per_token(s, cols, aligned, batch["labels"], s_ids, tau, tau_sq)
    ref = forward_kl(s, dense, temperature=tau, tau_squared=tau_sq)
    torch.testing.assert_close(ours[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_nan_teacher_rows_that_are_not_aligned_do_not_leak():
    batch, s, t, tea2stu = random_case(seed=10)
    crit = MinEditDisKLD(tea2stu, student_vocab=s.shape[-1])
    n_aligned = crit(batch, view(s), view(t)).metrics["aligned_fraction"]
    _, aligned = mined_transfer(t, batch["mined_teacher_index"], batch["input_ids"],
                                batch["teacher_input_ids"], batch["labels"], crit.tea2stu,
                                crit.stu2tea_teacher)
    b, j = aligned.nonzero()[0].tolist()
    t = t.clone()
    t[b, batch["mined_teacher_index"][b, j]] = float("nan")   # now fails condition (c)
    s = s.requires_grad_()
    out = crit(batch, view(s), view(t))
    out.loss_sum.backward()
    assert out.metrics["aligned_fraction"] < n_aligned
    assert torch.isfinite(out.loss_sum) and torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- battery
@pytest.mark.parametrize("tau,tau_sq,comb", [(1.0, False, "published"), (2.0, False, "additive"),
                                             (2.0, True, "interpolate")])
def test_batched_equals_loop_oracle(tau, tau_sq, comb):
    batch, s, t, tea2stu = random_case(seed=2)
    crit = MinEditDisKLD(tea2stu, student_vocab=s.shape[-1], teacher_vocab=t.shape[-1], kd_rate=0.3,
                         kd_temperature=tau, tau_squared=tau_sq, loss_combination=comb)
    loss, n, _ = crit(batch, view(s), view(t))
    ref = oracle_loss(s, t, batch, tea2stu, 0.3, tau, tau_sq,
                      "additive" if comb == "additive" else "interpolate")
    assert n.item() == int(batch["labels"].ne(-100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_zero_kd_when_the_aligned_teacher_equals_the_student():
    # identity map, teacher == student tokenization and logits, every label position aligned
    g = torch.Generator().manual_seed(3)
    B, T, V = 2, 5, 8
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 0] = -100
    index = torch.arange(T).expand(B, T).masked_fill(labels.eq(-100), -1)
    batch = {"input_ids": ids, "labels": labels, "teacher_input_ids": ids, "mined_teacher_index": index}
    logits = torch.randn(B, T, V, generator=g)
    crit = MinEditDisKLD(list(range(V)), student_vocab=V, kd_rate=1.0, kd_temperature=2.0)
    loss, _, metrics = crit(batch, view(logits), view(logits.clone()))
    assert metrics["aligned_fraction"].item() == int(labels.ne(-100).sum())
    assert abs(metrics["kd_loss"].item()) < 1e-5 and abs(loss.item()) < 1e-5


def test_padding_does_not_change_the_value():
    batch, s, t, tea2stu = random_case(seed=4)
    crit = MinEditDisKLD(tea2stu, student_vocab=s.shape[-1], kd_rate=0.5, kd_temperature=2.0)
    loss, n, _ = crit(batch, view(s), view(t))
    pad_s, pad_t = 3, 4
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.zeros(3, pad_s, dtype=torch.long)], 1),
        "labels": torch.cat([batch["labels"], torch.full((3, pad_s), -100)], 1),
        "mined_teacher_index": torch.cat([batch["mined_teacher_index"], torch.full((3, pad_s), -1)], 1),
        "teacher_input_ids": torch.cat([batch["teacher_input_ids"], torch.zeros(3, pad_t, dtype=torch.long)], 1),
    }
    s2 = torch.cat([s, 1e3 * torch.randn(3, pad_s, s.shape[-1])], 1)     # garbage at padding
    t2 = torch.cat([t, torch.full((3, pad_t, t.shape[-1]), float("nan"))], 1)
    loss2, n2, _ = crit(padded, view(s2), view(t2))
    assert n2 == n
    torch.testing.assert_close(loss2, loss)


def test_all_masked_gives_a_finite_zero_with_gradients():
    batch, s, t, tea2stu = random_case(seed=5)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    batch["mined_teacher_index"] = torch.full_like(batch["labels"], -1)
    s = s.requires_grad_()
    crit = MinEditDisKLD(tea2stu, student_vocab=s.shape[-1])
    loss, n, _ = crit(batch, view(s), view(t))
    loss.backward()
    assert n.item() == 0 and loss.item() == 0.0
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() == 0


def test_condition_c_falls_back_to_one_hot():
    # every mapped teacher logit at or below the fill value -> no teacher information
    crit = MinEditDisKLD([0, 1], student_vocab=3, kd_rate=1.0)
    batch = {"input_ids": torch.tensor([[1]]), "labels": torch.tensor([[2]]),
             "teacher_input_ids": torch.tensor([[1]]), "mined_teacher_index": torch.tensor([[0]])}
    s = torch.randn(1, 1, 3)
    loss, _, metrics = crit(batch, view(s), view(torch.full((1, 1, 2), -2e5)))
    assert metrics["aligned_fraction"].item() == 0
    torch.testing.assert_close(loss, -torch.log_softmax(s[0, 0], -1)[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_not_mutated_and_bf16_logits_work(dtype):
    """In fp32 too: the published fp32 code wrote the targets into a view of the student's logits
    (``.float()`` does not copy), which made its KL exactly 0."""
    batch, s, t, tea2stu = random_case(seed=6)
    s, t = s.to(dtype), t.to(dtype)
    before = ({k: v.clone() for k, v in batch.items()}, s.clone(), t.clone())
    crit = MinEditDisKLD(tea2stu, student_vocab=s.shape[-1])
    loss, _, metrics = crit(batch, view(s), view(t))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.equal(batch[k], before[0][k]) for k in batch)
    assert torch.equal(s, before[1]) and torch.equal(t, before[2])
    assert metrics["kd_loss"] > 1.0


def test_gradcheck_float64():
    batch, s, t, tea2stu = random_case(seed=7, B=2, T_s=4, T_t=5, V_s=6, V_t=9, dtype=torch.float64)
    crit = MinEditDisKLD(tea2stu, student_vocab=6, kd_rate=0.4, kd_temperature=1.5)
    s = s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: crit(batch, view(x), view(t)).loss_sum, (s,))


def test_gradient_matches_the_oracle():
    batch, s, t, tea2stu = random_case(seed=8)
    crit = MinEditDisKLD(tea2stu, student_vocab=s.shape[-1], kd_rate=0.7, kd_temperature=2.0)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    crit(batch, view(s1), view(t)).loss_sum.backward()
    oracle_loss(s2, t, batch, tea2stu, 0.7, 2.0).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- errors, construction
def test_bad_map_and_missing_alignment_are_clear_errors():
    with pytest.raises(ValueError, match="outside the student vocabulary"):
        MinEditDisKLD([0, 9], student_vocab=5)
    with pytest.raises(ValueError, match="teacher logits have only 1"):
        MinEditDisKLD([0, 1], student_vocab=5, teacher_vocab=1)
    crit = MinEditDisKLD([0, 1], student_vocab=2)
    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.zeros(1, 1, dtype=torch.long),
             "teacher_input_ids": torch.zeros(1, 1, dtype=torch.long)}
    with pytest.raises(KeyError, match="mined_teacher_index"):
        crit(batch, view(torch.zeros(1, 1, 2)), view(torch.zeros(1, 1, 2)))


def _args(**kw):
    from mckd.criteria.options import CriterionOptions, KDOptions

    return CriterionOptions([KDOptions(**kw)])


def test_from_options_reads_an_existing_map(tmp_path):
    from mckd.data.vocab_map import save_vocab_map

    path = save_vocab_map([2, 0, 2], tmp_path / "map.json")
    cls = get_criterion_class("min_edit_dis_kld")
    crit = cls.from_options(_args(teacher_to_student_id_mapping=str(path)),
                            ModelDims(student_hidden=8, student_vocab=4, teacher_hidden=8, teacher_vocab=3),
                            CriterionResources())
    assert crit.tea2stu.tolist() == [2, 0, 2] and crit.stu2tea_teacher.tolist() == [1, 0]
    assert cls.alignment == ("mined_dtw",) and cls.needs_teacher
    with pytest.raises(ValueError, match="does not exist"):
        cls.from_options(_args(teacher_to_student_id_mapping=str(tmp_path / "none.json")),
                         ModelDims(8, 4), CriterionResources())


def test_from_options_builds_a_missing_map(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer("gpt2")
    out = tmp_path / "built.json"
    crit = MinEditDisKLD.from_options(_args(teacher_to_student_id_mapping=str(out)),
                                      ModelDims(8, len(tok), 8, len(tok)),
                                      CriterionResources(student_tokenizer=tok, teacher_tokenizer=tok))
    assert out.is_file() and torch.equal(crit.tea2stu, torch.arange(len(tok)))

# The end-to-end runs (GPT-2 <- Qwen and TinyLLaMA <- Mistral, plain torch and ZeRO-2) are in
# test_criteria_e2e.py's baseline matrix.
