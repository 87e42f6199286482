"""The training loop end to end on tiny models, bad inputs, and the normalisation contract."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_train_support as sup
from mckd.config import ConfigError, parse_config
from mckd.models.loading import ModelLoadError
from mckd.train.loop import TrainingAborted, run
from mckd.train.rundir import RunDirError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sup.write_data(tmp_path_factory.mktemp("data"), n_train=16, n_dev=4)


@pytest.mark.slow
def test_sft_end_to_end_checkpoint_loads(tiny_models, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_models("gpt2")
    out = tmp_path / "run"
    res = run(parse_config(sup.train_argv(model, data, out, "--total-iters", "3",
                                          "--interval-unit", "step", "--save-interval", "2",
                                          "--eval-interval", "2")))
    assert res["global_step"] == 3
    args = json.loads((out / "args.json").read_text())
    assert args["derived"]["total_steps"] == 3 and args["derived"]["iters_per_epoch"] == 4
    train_lines = [r for r in sup.read_jsonl(out / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens"] > 0 for r in train_lines)
    assert (out / "train.log").read_text().count("train |") == 3
    assert list((out / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in out.iterdir() if p.name.startswith("epoch"))
    assert ckpts == ["epoch0_step2", "epoch0_step3"]
    final = out / "epoch0_step3"
    assert (final / "model.safetensors").is_file() and (final / "criterion.pt").is_file()
    assert json.loads((final / "trainer_state.json").read_text())["dev"]["loss"] > 0
    trained = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    init = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    AutoTokenizer.from_pretrained(final, local_files_only=True)
    diff = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), init.parameters())]
    assert max(diff) > 0  # the saved weights are the trained ones


@pytest.mark.slow
def test_vanilla_kd_runs_and_saves_criterion_state(tiny_models, data, tmp_path):
    student, teacher = tiny_models("gpt2"), tiny_models("gpt2", seed=1)
    out = tmp_path / "kd"
    run(parse_config(sup.train_argv(student, data, out, "--total-iters", "2", "--teacher-model-path",
                                    str(teacher), "--eval-interval", "0", criterion="test_kd")))
    state = torch.load(out / "epoch0_step2" / "criterion.pt")
    assert int(state["updates"]) == 2  # after_optimizer_step ran once per step
    rec = sup.read_jsonl(out / "metrics.jsonl")[-1]
    assert rec["kd_loss"] > 0 and "stat/hidden_norm" in rec


def test_refuses_non_empty_output_dir(tiny_models, data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(RunDirError, match="--resume .* --overwrite"):
        run(parse_config(sup.train_argv(tiny_models("gpt2"), data, out, "--total-iters", "1")))
    assert sorted(p.name for p in out.iterdir()) == ["something"]


def test_bad_teacher_fails_before_any_output(tiny_models, data, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    src = Path(tiny_models("gpt2"))
    (teacher / "config.json").write_text((src / "config.json").read_text())  # no tokenizer files
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="--teacher-model-path: .* no tokenizer files"):
        run(parse_config(sup.train_argv(src, data, out, "--total-iters", "1", "--teacher-model-path",
                                        str(teacher), criterion="test_kd")))
    assert not out.exists()
    (teacher / "tokenizer_config.json").write_text("{}")  # tokenizer files present, weights missing
    with pytest.raises(ModelLoadError, match="--teacher-model-path"):
        run(parse_config(sup.train_argv(src, data, out, "--total-iters", "1", "--teacher-model-path",
                                        str(teacher), criterion="test_kd")))
    assert not out.exists()  # the directory taken for the run is given back


@pytest.mark.slow
def test_nan_steps_are_skipped_then_abort_with_checkpoint(tiny_models, data, tmp_path):
    sup.NaNAt.calls, sup.NaNAt.bad_calls = 0, {2}  # first micro-batch of the second step
    out = tmp_path / "nan1"
    res = run(parse_config(sup.train_argv(tiny_models("gpt2"), data, out, "--total-iters", "3",
                                          "--eval-interval", "0", criterion="test_nan")))
    assert res["global_step"] == 3  # the skipped step's batches are dropped, training goes on
    steps = [r["step"] for r in sup.read_jsonl(out / "metrics.jsonl")]
    assert steps == [1, 2, 3] and "step skipped" in (out / "train.log").read_text()
    sup.NaNAt.calls, sup.NaNAt.bad_calls = 0, set(range(2, 100))
    out = tmp_path / "nan2"
    with pytest.raises(TrainingAborted, match="--nan-patience 2"):
        run(parse_config(sup.train_argv(tiny_models("gpt2"), data, out, "--total-iters", "3",
                                        "--nan-patience", "2", "--eval-interval", "0",
                                        criterion="test_nan")))
    saved = [p for p in out.iterdir() if p.name.endswith("nan-abort")]
    assert saved and (saved[0] / "model.safetensors").is_file()
    assert saved[0].name == "epoch0_step1_nan-abort"  # the state after the last good step
    sup.NaNAt.bad_calls = set()


@pytest.mark.slow
def test_entry_point_vanilla_kd_with_real_criterion(tiny_models, data, tmp_path):
    """``python code/distillation.py`` with the published vanilla-KD flags."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "vkd"
    argv = sup.train_argv(tiny_models("gpt2"), data, out, "--total-iters", "2", "--teacher-model-path",
                          str(tiny_models("gpt2", seed=1)), "--kd-rate", "0.5", "--kd-temperature",
                          "2.0", "--kd-objective", "forward_kl", "--do-train", "--do-valid",
                          "--eval-gen", "--eval-gen-num", "2", "--max-new-tokens", "4",
                          "--keep-best-n-checkpoints", "1", criterion="various_divergence")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(root / "code" / "distillation.py"), *argv], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    dev = [r for r in sup.read_jsonl(out / "metrics.jsonl") if r.get("split") == "dev"]
    assert dev and "rougeL" in dev[-1] and dev[-1]["loss"] > 0
    train = [r for r in sup.read_jsonl(out / "metrics.jsonl") if "split" not in r]
    assert all(r["kd_loss"] >= 0 and r["nll_loss"] > 0 for r in train)
    # a bad flag exits with status 2 and a suggestion, before anything is written
    res = subprocess.run([sys.executable, str(root / "code" / "distillation.py"), *argv[:-2],
                          "--kd-temprature", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "did you mean '--kd-temperature'" in res.stderr
