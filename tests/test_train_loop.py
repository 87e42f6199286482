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


def test_early_stop_after_patience_dev_evaluations_without_improvement(tiny_models, data, tmp_path,
                                                                         monkeypatch):
    from mckd.train.loop import Trainer

    scripted = iter([3.0, 2.0, 2.5, 2.2, 1.0, 0.5])  # evaluations 3 and 4 do not improve on 2.0

    def fake_eval(self):
        loss = next(scripted)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": self.state["global_step"], "split": "dev", "loss": loss}) + "\n")
        return {"loss": loss, "accuracy": 0.0}

    monkeypatch.setattr(Trainer, "evaluate", fake_eval)
    out = tmp_path / "early"
    res = run(parse_config(sup.train_argv(tiny_models("gpt2"), data, out, "--total-iters", "8",
                                          "--interval-unit", "step", "--eval-interval", "1",
                                          "--save-interval", "1", "--keep-best-n-checkpoints", "1",
                                          "--early-stop-patience", "2")))
    assert res["global_step"] == 4
    assert "early stop: the dev loss has not improved for 2 evaluations (best 2.0000)" in \
        (out / "train.log").read_text()
    # the checkpoint with the best dev loss is kept (and the last one, for resuming)
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("epoch"))
    assert "epoch0_step2" in kept
    with pytest.raises(ConfigError, match="--early-stop-patience"):
        parse_config(sup.train_argv(tiny_models("gpt2"), data, tmp_path / "x", "--eval-interval", "0",
                                    "--early-stop-patience", "2"))


@pytest.mark.parametrize("separate", [False, True])
def test_student_and_criterion_gradients_are_clipped_jointly_or_apart(separate):
    import math

    from mckd.train.engine import TorchEngine

    module = torch.nn.Module()
    module.student, module.criterion = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    eng = TorchEngine(module, opt, sched, device=torch.device("cpu"), precision="fp32", clip_grad=1.0,
                      clip_grad_criterion=0.5 if separate else None)
    for p in module.student.parameters():
        p.grad = torch.full_like(p, 0.3)          # 8 entries: norm 0.3 * sqrt(8) = 0.849
    for p in module.criterion.parameters():
        p.grad = torch.full_like(p, 2.0)          # 6 entries: norm 2 * sqrt(6) = 4.899
    n_s, n_c = 0.3 * math.sqrt(8), 2.0 * math.sqrt(6)

    def norm(m):
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.parameters()))

    total = eng._clip()
    assert total == pytest.approx(math.hypot(n_s, n_c), rel=1e-6)
    assert eng.last_norms == {"grad_norm_student": pytest.approx(n_s, rel=1e-6),
                              "grad_norm_criterion": pytest.approx(n_c, rel=1e-6)}
    if separate:   # the student's step is untouched by the large projector gradient
        assert norm(module.student) == pytest.approx(n_s, rel=1e-5)
        assert norm(module.criterion) == pytest.approx(0.5, rel=1e-5)
    else:          # one factor for both: the student's gradient shrinks with the projector's
        f = 1.0 / math.hypot(n_s, n_c)
        assert norm(module.student) == pytest.approx(n_s * f, rel=1e-5)
        assert norm(module.criterion) == pytest.approx(n_c * f, rel=1e-5)
