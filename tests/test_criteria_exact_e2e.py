"""The exact-alignment criteria (DSKDv2, GOLD's hybrid ULD, DWA-KD) through ``code/distillation.py``
on tiny random-init models with stand-in tokenizers (see ``conftest.py``): GPT-2 <- Qwen (full fine-tuning) and
TinyLLaMA <- Mistral (LoRA student), two optimizer steps under plain torch and DeepSpeed ZeRO-2
with the same loss curve."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_distillation, write_word_data

CRITERIA = {  # criterion -> extra flags worth a run through the entry point
    "dual_space_kd_v2": [],
    "uld_hybrid": ["--kd-rate", "1.0"],
    "dwa_kd": ["--dwa-gamma", "0.5"],
}
PAIRS = {"gpt2-qwen": ("gpt2", "qwen", False), "tinyllama-mistral-lora": ("tinyllama", "mistral", True)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_word_data(tmp_path_factory.mktemp("exact_e2e_data"))


def _run(save, tiny_models, data, criterion, pair, deepspeed, extra=()):
    student, teacher, lora = PAIRS[pair]
    argv = ["--model-path", str(tiny_models(student)), "--teacher-model-path", str(tiny_models(teacher, seed=1)),
            "--criterion", criterion, "--data-dir", str(data), "--save-dir", str(save), "--lr", "1e-3",
            "--batch-size", "2", "--total-iters", "2", "--max-length", "64", "--max-prompt-length", "32",
            "--precision", "fp32", "--log-interval", "1", "--eval-interval", "0", "--kd-rate", "0.5",
            "--num-workers", "0", "--seed", "7", *CRITERIA[criterion], *extra,
            "--projector-config-path", str(ROOT / "configs" / "projector_config.json")]
    if lora:
        argv += ["--peft", "lora", "--peft-lora-r", "4", "--peft-lora-alpha", "8"]
    if deepspeed:
        argv += ["--deepspeed", "--deepspeed_config", str(ROOT / "configs" / "deepspeed" / "ds_config_zero2_fp32.json")]
    assert run_distillation(argv) == 0
    rows = [json.loads(x) for x in Path(save, "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "split" not in r]


@pytest.mark.slow
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_exact_criteria_train_under_torch_and_deepspeed_zero2(tmp_path, tiny_models, data, criterion, pair):
    pytest.importorskip("deepspeed")
    curves = {}
    for engine in ("torch", "zero2"):
        save = tmp_path / engine
        train = _run(save, tiny_models, data, criterion, pair, engine == "zero2")
        assert [r["step"] for r in train] == [1, 2]
        for r in train:
            assert math.isfinite(r["loss"]) and r["loss"] > 0
            assert math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0
            if criterion != "dwa_kd":   # the share of exactly aligned label positions is logged
                assert 0.2 < r["exact_aligned_fraction"] <= 1.0
            else:
                assert math.isfinite(r["dtw_loss"])
        curves[engine] = [(r["loss"], r["kd_loss"]) for r in train]
        ckpt = sorted(p for p in save.iterdir() if p.name.startswith("epoch"))[-1]
        assert (ckpt / "adapter_config.json").is_file() == PAIRS[pair][2]
        if criterion != "uld_hybrid":
            assert any(k.startswith("projectors.") for k in torch.load(ckpt / "criterion.pt"))
    for (l_t, kd_t), (l_z, kd_z) in zip(curves["torch"], curves["zero2"]):
        assert l_z == pytest.approx(l_t, rel=1e-4) and kd_z == pytest.approx(kd_t, rel=1e-4)


@pytest.mark.slow
def test_dwa_kd_on_exact_alignment_entry_point(tmp_path, tiny_models, data):
    """``--dwa-token-alignment exact`` with DSKDv2's learned s2t projector trains too."""
    train = _run(tmp_path / "out", tiny_models, data, "dwa_kd", "gpt2-qwen", False,
                 ["--dwa-token-alignment", "exact", "--dskdv2-s2t", "linear"])
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) and 0.2 < r["exact_aligned_fraction"] <= 1.0 for r in train)


@pytest.mark.slow
def test_mcw_kd_exact_align_entry_point(tmp_path, tiny_models, data):
    """MCW-KD with ``--exact-align`` adds the direct KL on exactly aligned positions."""
    student, teacher, _ = PAIRS["gpt2-qwen"]
    save = tmp_path / "mcw"
    argv = ["--model-path", str(tiny_models(student)), "--teacher-model-path", str(tiny_models(teacher, seed=1)),
            "--criterion", "mcw_kd", "--exact-align", "--data-dir", str(data), "--save-dir", str(save),
            "--lr", "1e-3", "--batch-size", "2", "--total-iters", "2", "--max-length", "64",
            "--max-prompt-length", "32", "--precision", "fp32", "--log-interval", "1", "--eval-interval", "0",
            "--num-workers", "0", "--projector-config-path", str(ROOT / "configs" / "projector_config.json")]
    assert run_distillation(argv) == 0
    rows = [json.loads(x) for x in Path(save, "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["exact_kl"] > 0 and 0.2 < r["exact_aligned_fraction"] <= 1.0 for r in train)
    args = json.loads(Path(save, "args.json").read_text())
    assert "exact" in json.dumps(args)
