"""Every criterion through the real entry point ``code/distillation.py`` on tiny random-init models
(stand-in tokenizers, see ``conftest.py``).

- Vanilla KD (TVD with temperature scaling), GPT-2 <- GPT-2, plain torch.
- The baseline matrix: DSKD, DSKD-CMA, ULD, MinED and Multi-Level OT on GPT-2 <- Qwen (full
  fine-tuning) and TinyLLaMA <- Mistral (LoRA student), each under plain torch and DeepSpeed ZeRO-2;
  MinED reads a map built by ``mckd.data.vocab_map`` for the stand-in vocabularies.
  MCW-KD has its own runs in ``test_mcw_e2e.py``; the subprocess/launcher paths are exercised by
  ``test_scripts.py`` and ``test_distributed_training.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_distillation, write_word_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_word_data(tmp_path_factory.mktemp("e2e_data"))


@pytest.mark.slow
def test_vanilla_kd_entry_point(tmp_path, tiny_models, data):
    save = tmp_path / "out"
    argv = ["--model-path", str(tiny_models("gpt2")), "--teacher-model-path", str(tiny_models("gpt2", seed=1)),
            "--criterion", "various_divergence", "--kd-objective", "tvd", "--kd-temperature-scaling",
            "--data-dir", str(data), "--save-dir", str(save), "--lr", "1e-3", "--batch-size", "2",
            "--total-iters", "2", "--max-length", "64", "--max-prompt-length", "32", "--precision", "fp32",
            "--log-interval", "1", "--eval-interval", "0", "--kd-rate", "0.5", "--num-workers", "0"]
    assert run_distillation(argv) == 0
    rows = [json.loads(x) for x in Path(save, "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0


# --- The baseline matrix: every cross-tokenizer baseline on both model pairs, plain torch and ZeRO-2 ---
# DSKD without CMA projects hidden states position by position, so it needs one tokenization: its
# teachers share the student's vocabulary (GPT-2 <- GPT-2, TinyLLaMA <- Llama-2), as in the scripts.
BASELINES = ["dual_space_kd", "dual_space_kd_with_cma", "universal_logit_distillation",
             "min_edit_dis_kld", "multi_level_ot"]
PAIRS = {  # pair -> (student, cross-vocabulary teacher, same-vocabulary teacher, MinED map, LoRA)
    "gpt2-qwen": ("gpt2", "qwen", "gpt2", "qwen_to_gpt2", False),
    "tinyllama-mistral-lora": ("tinyllama", "mistral", "llama2", "mistral_to_tinyllama", True),
}
FLAGS = {  # non-default options worth a run through the entry point
    "dual_space_kd_with_cma": ["--teacher-temperature", "2.0"],
    "universal_logit_distillation": ["--loss-combination", "additive"],
    "min_edit_dis_kld": ["--kd-temperature", "2.0"],
}


def _matrix_run(save, tiny_models, data, criterion, pair, deepspeed, mined_map=None, real=False):
    from conftest import shared_path

    student, cross, same, map_name, lora = PAIRS[pair]
    teacher = same if criterion == "dual_space_kd" else cross
    argv = ["--model-path", str(tiny_models(student, real=real)),
            "--teacher-model-path", str(tiny_models(teacher, seed=1, real=real)),
            "--criterion", criterion, "--data-dir", str(data), "--save-dir", str(save), "--lr", "1e-3",
            "--batch-size", "2", "--total-iters", "2", "--max-length", "64", "--max-prompt-length", "32",
            "--precision", "fp32", "--log-interval", "1", "--eval-interval", "0", "--kd-rate", "0.5",
            "--num-workers", "0", "--seed", "7", *FLAGS.get(criterion, []),
            "--projector-config-path", str(ROOT / "configs" / "projector_config.json")]
    if criterion == "min_edit_dis_kld":
        path = (shared_path("reference", "vocab_alignment", map_name, "tea2stu_id_mapping.json") if real
                else mined_map(f"tiny-{teacher}", f"tiny-{student}"))
        argv += ["--teacher-to-student-id-mapping", str(path)]
    if lora:
        argv += ["--peft", "lora", "--peft-lora-r", "4", "--peft-lora-alpha", "8"]
    if deepspeed:
        argv += ["--deepspeed", "--deepspeed_config", str(ROOT / "configs" / "deepspeed" / "ds_config_zero2_fp32.json")]
    assert run_distillation(argv) == 0
    rows = [json.loads(x) for x in Path(save, "metrics.jsonl").read_text().splitlines() if x.strip()]
    args = json.loads(Path(save, "args.json").read_text())
    return [r for r in rows if "split" not in r], args


@pytest.mark.slow
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("criterion", BASELINES)
def test_baseline_trains_under_torch_and_deepspeed_zero2(tmp_path, tiny_models, mined_map, data, criterion,
                                                         pair):
    """Each baseline trains 2 optimizer steps through ``code/distillation.py`` under plain torch and
    under DeepSpeed ZeRO-2 (fp32, one CPU process, gloo); with the same seed the two engines give the
    same loss curve, and the checkpoint carries the LoRA adapter and the criterion's own state."""
    pytest.importorskip("deepspeed")
    curves = {}
    for engine in ("torch", "zero2"):
        save = tmp_path / engine
        train, args = _matrix_run(save, tiny_models, data, criterion, pair, engine == "zero2", mined_map)
        assert args["dist"]["deepspeed"] is (engine == "zero2")
        assert [r["step"] for r in train] == [1, 2]
        for r in train:
            assert math.isfinite(r["loss"]) and r["loss"] > 0
            assert math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0
        if criterion == "min_edit_dis_kld":    # the DTW + id map align most response tokens
            assert all(0.0 < r["aligned_fraction"] <= 1.0 for r in train)
        if criterion == "dual_space_kd_with_cma":
            assert all(r["t2s_ce_loss"] > 0 and r["s2t_kd_loss"] > 0 for r in train)
        curves[engine] = [(r["loss"], r["kd_loss"]) for r in train]
        ckpt = sorted(p for p in save.iterdir() if p.name.startswith("epoch"))[-1]
        assert (ckpt / "adapter_config.json").is_file() == PAIRS[pair][4]
        if criterion.startswith("dual_space"):
            assert any(k.startswith("projectors.") for k in torch.load(ckpt / "criterion.pt"))
    for (l_t, kd_t), (l_z, kd_z) in zip(curves["torch"], curves["zero2"]):
        assert l_z == pytest.approx(l_t, rel=1e-4) and kd_z == pytest.approx(kd_t, rel=1e-4)
