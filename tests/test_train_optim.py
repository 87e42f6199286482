"""Optimizer groups (no decay for biases and every norm layer of any family), schedules, and the
gradient-normalisation contract (accumulation == one big batch)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import test_train_support as sup
from mckd.train import optim


@pytest.mark.parametrize("family", ["gpt2", "llama2", "qwen"])
def test_no_decay_covers_every_norm_and_bias(tiny_models, family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models(family), local_files_only=True)
    crit = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = {g["name"]: g for g in optim.param_groups(model, crit, lr=1e-3, weight_decay=0.1,
                                                       projector_lr=5e-3)}
    nd = {id(p) for p in groups["student_no_decay"]["params"]}
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    assert norms, "every family has normalisation layers"
    for m in norms:
        for p in m.parameters(recurse=False):
            assert id(p) in nd, type(m).__name__
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert id(p) in nd, name
        elif "norm" not in name and "ln_" not in name:
            assert id(p) not in nd, name  # matrices and embeddings keep their decay
    assert groups["student_no_decay"]["weight_decay"] == 0.0
    assert groups["criterion_decay"]["lr"] == 5e-3 and groups["criterion_no_decay"]["weight_decay"] == 0.0
    n_all = sum(p.numel() for p in list(model.parameters()) + list(crit.parameters()))
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_all


def test_frozen_parameters_are_left_out():
    m = nn.Linear(3, 3)
    m.weight.requires_grad_(False)
    groups = optim.param_groups(m, None, lr=1.0, weight_decay=0.1, projector_lr=None)
    assert [g["name"] for g in groups] == ["student_no_decay"]


def test_schedules():
    f = lambda s, style, warm=0: optim.lr_multiplier(s, total=10, warmup=warm, style=style, min_ratio=0.1)  # noqa: E731
    assert f(0, "cosine") == pytest.approx(1.0) and f(10, "cosine") == pytest.approx(0.1)
    assert f(5, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(5, "linear") == pytest.approx(0.1 + 0.9 * 0.5) and f(10, "linear") == pytest.approx(0.1)
    assert f(7, "constant") == 1.0
    # warmup is honoured by every style: 1/warm, 2/warm, ... then the decay starts at the peak
    for style in ("cosine", "linear", "constant"):
        assert [f(s, style, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
        assert f(4, style, 4) == pytest.approx(1.0)
    assert f(10, "cosine", 4) == pytest.approx(0.1)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2.0)
    sch = optim.build_scheduler(opt, total=10, warmup=2, style="linear", lr=2.0, lr_min=0.0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs[:3] == pytest.approx([1.0, 2.0, 2.0]) and lrs[-1] == pytest.approx(2.0 * 1 / 8)
    with pytest.raises(ValueError, match="--lr-decay-style"):
        optim.lr_multiplier(3, total=10, warmup=0, style="noam", min_ratio=0.0)


def _grads_of_step(model_path, rows, micro_sizes, collator, dtype=torch.float32):
    """Gradients after one optimizer step of the real loop code (Trainer._step) split as given."""
    from transformers import AutoModelForCausalLM

    from mckd.criteria import get_criterion_class
    from mckd.train.engine import DistillModule, TorchEngine
    from mckd.train.loop import Trainer
    from mckd.train.teacher_source import LiveTeacher

    student = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=dtype)
    student.eval()  # no dropout: the two runs must see the same function
    crit = get_criterion_class("cross_entropy")()
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tr = Trainer.__new__(Trainer)
    tr.state, tr.device, tr.teacher, tr.total_steps, tr.criterion = (
        {"global_step": 0}, torch.device("cpu"), None, 1, crit)
    tr.teacher_source = LiveTeacher()
    tr.engine = TorchEngine(DistillModule(student, crit), opt, sch, device=tr.device,
                            precision="fp32", clip_grad=0.0)
    captured = {}

    def finish():
        captured.update({n: p.grad.detach().clone() for n, p in student.named_parameters()})
        return 0.0, False

    tr.engine.finish_step = finish
    micro, i = [], 0
    for k in micro_sizes:
        micro.append(collator(rows[i:i + k]))
        i += k
    tr._step(micro, {})
    return captured


def test_accumulation_gives_the_big_batch_gradient(tiny_models, tmp_path):
    from mckd.data import DistillCollator, build_dataset
    from mckd.models.tokenizers import load_tokenizer

    model = tiny_models("gpt2")
    tok = load_tokenizer(str(model))
    data = sup.write_data(tmp_path / "d", n_train=8, n_dev=1)
    ds = build_dataset(data / "train.jsonl", student_tokenizer=tok, max_length=48,
                       max_prompt_length=32, cache_dir=tmp_path / "cache")
    rows = [ds[i] for i in range(8)]
    col = DistillCollator(tok.pad_token_id)
    n_tok = [sum(1 for y in r["labels"] if y != -100) for r in rows]
    assert len(set(n_tok)) > 1  # unequal token counts: a per-micro-batch mean would differ
    big = _grads_of_step(model, rows, [8], col)
    acc = _grads_of_step(model, rows, [2, 2, 2, 2], col)
    uneven = _grads_of_step(model, rows, [1, 3, 4], col)
    for other in (acc, uneven):
        num = max((big[n] - other[n]).abs().max().item() for n in big)
        den = max(big[n].abs().max().item() for n in big)
        assert num / den < 2e-6, num / den
    assert math.isfinite(den) and den > 0
