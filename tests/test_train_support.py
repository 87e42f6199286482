"""Stand-in criteria and small helpers for the training tests (no tests here).

The stand-ins are registered under test-only names so they never clash with the real criteria;
they follow the Criterion contract exactly (token-summed loss, token count, token-sum metrics).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mckd.criteria.base import Criterion, CriterionOutput, get_criterion_class, register_criterion


def _ce_sum(logits, labels):
    mask = labels != -100
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.clamp_min(0).flatten(), reduction="none")
    nll = nll.view_as(labels) * mask
    return nll.sum(), mask.sum()


def _register(name, cls):
    try:
        return get_criterion_class(name)
    except KeyError:
        return register_criterion(name)(cls)


class StandInCE(Criterion):
    """Token-summed cross entropy."""

    def forward(self, batch, student, teacher):
        loss, n = _ce_sum(student.logits, batch["labels"])
        acc = ((student.logits.argmax(-1) == batch["labels"]) & (batch["labels"] != -100)).sum()
        return CriterionOutput(loss, n, {"nll_loss": loss.detach(), "accuracy": acc.float()})


class StandInKD(Criterion):
    """CE + forward KL to a same-vocabulary teacher, with a trainable scalar and a rule buffer."""

    needs_teacher = True
    needs_hidden = True

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)  # a trainable part, to exercise the projector group
        self.register_buffer("updates", torch.zeros(()))

    def forward(self, batch, student, teacher):
        ce, n = _ce_sum(student.logits, batch["labels"])
        mask = batch["labels"] != -100
        v = min(student.logits.shape[-1], teacher.logits.shape[-1])
        t = teacher.logits[..., :v].float().log_softmax(-1)
        s = student.logits[..., :v].float().log_softmax(-1)
        kl = (t.exp() * (t - s)).sum(-1) * mask
        reg = self.proj.weight.sum() * 0.0 + (self.proj.bias ** 2).sum() * 1e-3 * n
        loss = ce + 0.5 * kl.sum() + reg
        return CriterionOutput(loss, n, {"kd_loss": kl.sum().detach(), "stat/hidden_norm":
                                         student.hidden.float().norm(dim=-1).mean().detach()})

    def after_optimizer_step(self, all_reduce_mean):
        self.updates += 1
        return {"updates": float(self.updates)}


_register("test_ce", StandInCE)
_register("test_kd", StandInKD)


def write_data(d: Path, n_train: int = 24, n_dev: int = 6) -> Path:
    """A tiny jsonl dataset in the published schema."""
    d.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for split, n in (("train", n_train), ("dev", n_dev)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                instr = f"List {1 + i % 4} words starting from {words[i % 8]}."
                out = " ".join(words[(i + k) % 8] for k in range(1 + i % 4))
                f.write(json.dumps({"instruction": instr, "input": "", "output": out}) + "\n")
    return d


class NaNAt(Criterion):
    """Token-summed CE that turns non-finite on the forward calls (0-based, counted per process)
    listed in ``NaNAt.bad_calls``."""

    bad_calls: set = set()
    calls = 0

    def forward(self, batch, student, teacher):
        loss, n = _ce_sum(student.logits, batch["labels"])
        if NaNAt.calls in NaNAt.bad_calls:
            loss = loss * float("nan")
        NaNAt.calls += 1
        return CriterionOutput(loss, n, {})


_register("test_nan", NaNAt)


class GrowingLoss(Criterion):
    """Token-summed CE whose value is multiplied by ``GrowingLoss.factor ** (call - start)`` from
    forward call ``GrowingLoss.start`` on (counted per process): a loss that climbs by orders of
    magnitude while clipping keeps the weights finite."""

    start = 10 ** 9
    factor = 1000.0
    calls = 0

    def forward(self, batch, student, teacher):
        loss, n = _ce_sum(student.logits, batch["labels"])
        k = GrowingLoss.calls - GrowingLoss.start
        if k >= 0:
            loss = loss * GrowingLoss.factor ** (k + 1)
        GrowingLoss.calls += 1
        return CriterionOutput(loss, n, {})


class PoisonAt(Criterion):
    """Token-summed CE that overwrites the student's output head with NaN at forward call
    ``PoisonAt.call`` (counted per process): the weights are no longer finite."""

    call = 10 ** 9
    calls = 0

    def forward(self, batch, student, teacher):
        if PoisonAt.calls == PoisonAt.call:
            student.lm_head.weight.data.fill_(float("nan"))  # .data: outside autograd's view
        PoisonAt.calls += 1
        loss, n = _ce_sum(student.logits, batch["labels"])
        return CriterionOutput(loss, n, {})


_register("test_growing", GrowingLoss)
_register("test_poison", PoisonAt)


def train_argv(model, data, out, *extra, criterion="cross_entropy"):
    """A small, fast training command line."""
    return ["--model-path", str(model), "--data-dir", str(data), "--save-dir", str(out),
            "--criterion", criterion, "--lr", "1e-3", "--batch-size", "2",
            "--gradient-accumulation-steps", "2", "--max-length", "48", "--max-prompt-length", "32",
            "--num-workers", "0", "--log-interval", "1", "--eval-batch-size", "4", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def no_dropout_copy(model_dir, out_dir) -> Path:
    """Copy of a tiny model with every dropout probability set to 0 (deterministic functions for
    the equivalence tests)."""
    import shutil

    out_dir = Path(out_dir)
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    cfg = json.loads((out_dir / "config.json").read_text())
    for k in list(cfg):
        if "pdrop" in k or "dropout" in k:
            if isinstance(cfg[k], (int, float)) and not isinstance(cfg[k], bool):
                cfg[k] = 0.0
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


if __name__ == "__main__":  # entry point with the stand-ins registered (torchrun -m / deepspeed --module)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
    from distillation import main

    sys.exit(main(sys.argv[1:]))
