"""Smoke runs of every criterion of this engineer through the real entry point
``code/distillation.py`` on tiny random-init models with real tokenizers:
GPT-2 <- GPT-2 (same vocabulary) and GPT-2 <- Qwen1.5 (cross vocabulary)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_distillation, write_word_data

RUNS = [
    ("various_divergence", "gpt2", ["--kd-objective", "tvd", "--kd-temperature-scaling"]),
    ("dual_space_kd", "gpt2", []),
    ("dual_space_kd_with_cma", "qwen", ["--teacher-temperature", "2.0"]),
    ("universal_logit_distillation", "qwen", ["--loss-combination", "additive"]),
    ("multi_level_ot", "qwen", []),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_word_data(tmp_path_factory.mktemp("e2e_data"))


def _train(tmp_path, tiny_models, data, criterion, teacher, extra, *more):
    save = tmp_path / "out"
    argv = ["--model-path", str(tiny_models("gpt2")), "--criterion", criterion,
            "--data-dir", str(data), "--save-dir", str(save), "--lr", "1e-3", "--batch-size", "2",
            "--total-iters", "2", "--max-length", "64", "--max-prompt-length", "32",
            "--precision", "fp32", "--log-interval", "1", "--eval-interval", "0",
            "--kd-rate", "0.5", "--num-workers", "0", *extra, *more]
    if teacher:
        argv += ["--teacher-model-path", str(tiny_models(teacher, seed=1))]
    if criterion in ("dual_space_kd", "dual_space_kd_with_cma"):
        argv += ["--projector-config-path", str(ROOT / "configs" / "projector_config.json")]
    assert run_distillation(argv) == 0
    rows = [json.loads(x) for x in Path(save, "metrics.jsonl").read_text().splitlines() if x.strip()]
    return save, [r for r in rows if "split" not in r]


@pytest.mark.slow
@pytest.mark.parametrize("criterion,teacher,extra", RUNS, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(RUNS)])
def test_entry_point_smoke(tmp_path, tiny_models, data, criterion, teacher, extra):
    save, train = _train(tmp_path, tiny_models, data, criterion, teacher, extra)
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        if teacher:
            assert math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0
    if criterion.startswith("dual_space"):
        ckpt = sorted(p for p in save.iterdir() if p.name.startswith("epoch"))[-1]
        state = torch.load(ckpt / "criterion.pt")
        assert any(k.startswith("projectors.t2s") for k in state)


@pytest.mark.slow
def test_entry_point_deepspeed_zero2_cma(tmp_path, tiny_models, data):
    """DSKD-CMA (projectors in the DeepSpeed-wrapped module) under ZeRO-2, fp32, one CPU process,
    through ``python code/distillation.py`` in a subprocess."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    save = tmp_path / "ds"
    cmd = [sys.executable, str(ROOT / "code" / "distillation.py"),
           "--model-path", str(tiny_models("gpt2")), "--teacher-model-path", str(tiny_models("qwen", seed=1)),
           "--criterion", "dual_space_kd_with_cma", "--data-dir", str(data), "--save-dir", str(save),
           "--lr", "1e-3", "--batch-size", "2", "--total-iters", "2", "--max-length", "64",
           "--max-prompt-length", "32", "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0",
           "--deepspeed", "--deepspeed_config", str(ROOT / "configs" / "deepspeed" / "ds_config_zero2_fp32.json")]
    env = dict(os.environ, MASTER_PORT=str(29500 + os.getpid() % 1000))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in Path(save, "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["t2s_ce_loss"] > 0 and r["s2t_kd_loss"] > 0 for r in train)
    ckpt = sorted(p for p in save.iterdir() if p.name.startswith("epoch"))[-1]
    assert any(k.startswith("projectors.query") for k in torch.load(ckpt / "criterion.pt"))
