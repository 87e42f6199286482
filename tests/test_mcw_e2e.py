"""mcw_kd through the real entry point ``code/distillation.py`` on tiny random-init models with
stand-in tokenizers (see ``conftest.py``): GPT-2 <- Qwen (full fine-tuning, plain torch, default preset) and TinyLLaMA <- Mistral
(LoRA, DeepSpeed, reference preset with the data pipeline's DTW cost); ``--resume`` restores the cost
weights, the salience head, the projectors and the schedule position."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_distillation, write_word_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_word_data(tmp_path_factory.mktemp("mcw_e2e_data"))


def _run(argv):
    assert run_distillation(argv) == 0


def _argv(student, teacher, data, save, *extra):
    return ["--model-path", str(student), "--teacher-model-path", str(teacher), "--criterion", "mcw_kd",
            "--data-dir", str(data), "--save-dir", str(save), "--lr", "1e-3", "--batch-size", "2",
            "--max-length", "64", "--max-prompt-length", "32", "--precision", "fp32", "--log-interval", "1",
            "--eval-interval", "0", "--kd-rate", "0.5", "--num-workers", "0", "--mcw-top-k", "50",
            "--projector-config-path", str(ROOT / "configs" / "projector_config.json"), *extra]


def _train_rows(save):
    rows = [json.loads(x) for x in Path(save, "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "split" not in r]


def _ckpt(save, step):
    return next(p for p in Path(save).iterdir() if p.is_dir() and p.name.endswith(f"_step{step}"))


def test_gpt2_from_qwen_trains_and_resume_restores_criterion_state(tmp_path, tiny_models, data):
    student, teacher = tiny_models("gpt2"), tiny_models("qwen", seed=1)
    common = ("--total-iters", "4", "--interval-unit", "step", "--save-interval", "2",
              "--keep-best-n-checkpoints", "5", "--mcw-update-interval", "1")
    full = tmp_path / "full"
    _run(_argv(student, teacher, data, full, *common))
    rows = _train_rows(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k in ("loss", "ot_logits", "ot_hidden", "kd_loss"):
            assert math.isfinite(r[k]), k
        assert r["ot_logits"] > 0 and r["ot_hidden"] > 0
    assert [round(r["stat/interp_t"], 4) for r in rows] == [0.1, 0.325, 0.55, 0.775]  # optimizer steps
    init = torch.tensor([0.2, 0.5, 0.3])
    state4 = torch.load(_ckpt(full, 4) / "criterion.pt", map_location="cpu", weights_only=False)
    assert not torch.allclose(state4["weights_logits"], init)          # the QP rule ran
    assert abs(state4["weights_logits"].sum().item() - 1) < 1e-5
    assert state4["progress"].tolist() == [3, 4]

    # Resume from the step-2 checkpoint in a fresh directory: same final criterion state.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(_ckpt(full, 2), part / _ckpt(full, 2).name)
    _run(_argv(student, teacher, data, part, *common, "--resume"))
    resumed = torch.load(_ckpt(part, 4) / "criterion.pt", map_location="cpu", weights_only=False)
    for k in ("weights_logits", "weights_hidden", "progress", "salience_head.weight", "projectors.ot.0.weight"):
        torch.testing.assert_close(resumed[k], state4[k], rtol=1e-4, atol=1e-6, msg=k)
    s2 = torch.load(_ckpt(full, 2) / "criterion.pt", map_location="cpu", weights_only=False)
    assert not torch.equal(s2["salience_head.weight"], state4["salience_head.weight"])  # it is trained
