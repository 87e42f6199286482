"""On-policy training through the real entry point ``code/distillation.py`` on tiny random-init
models (stand-in tokenizers, see ``conftest.py``): ratio 0 leaves the loss curve bit for bit as it was, a resumed run
draws the same coins and samples and reproduces the curve, and DeepSpeed ZeRO-2 (one process),
torchrun (DDP) and the DeepSpeed launcher (ZeRO-3, generation in lock step) train with on-policy
batches."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_distillation, write_word_data

pytestmark = pytest.mark.slow
STATS = ("stat/on_policy", "stat/on_policy_finished", "stat/on_policy_retokenized")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_word_data(tmp_path_factory.mktemp("on_policy_e2e_data"), n_train=8)


def _argv(student, teacher, data, save, criterion, *extra):
    return ["--model-path", str(student), "--teacher-model-path", str(teacher), "--criterion", criterion,
            "--data-dir", str(data), "--save-dir", str(save), "--lr", "1e-3", "--batch-size", "2",
            "--max-length", "64", "--max-prompt-length", "32", "--precision", "fp32", "--log-interval", "1",
            "--eval-interval", "0", "--kd-rate", "0.5", "--num-workers", "0", "--seed", "5",
            "--projector-config-path", str(ROOT / "configs" / "projector_config.json"),
            "--on-policy-max-new-tokens", "6", *extra]


def _rows(save):
    rows = [json.loads(x) for x in Path(save, "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "split" not in r]


def _curve(save, keys=("loss", "kd_loss", "grad_norm", "tokens")):
    return [{k: r[k] for k in ("step", *keys) if k in r} for r in _rows(save)]


def test_ratio_zero_is_the_off_policy_run(tmp_path, tiny_models, data):
    """--on-policy-ratio 0 (whatever the other on-policy flags) gives the default run's curve
    exactly; ratio 1 trains on samples (every micro-batch on-policy, another curve)."""
    s, t = tiny_models("gpt2"), tiny_models("gpt2", seed=1)
    base = ["various_divergence", "--total-iters", "3", "--kd-objective", "forward_kl"]
    assert run_distillation(_argv(s, t, data, tmp_path / "default", *base)) == 0
    assert run_distillation(_argv(s, t, data, tmp_path / "zero", *base, "--on-policy-ratio", "0",
                                  "--on-policy-temperature", "0.5")) == 0
    assert run_distillation(_argv(s, t, data, tmp_path / "one", *base, "--on-policy-ratio", "1")) == 0
    default, zero = _curve(tmp_path / "default"), _curve(tmp_path / "zero")
    assert len(default) == 3 and zero == default  # exact equality of every logged value
    assert not any(k.startswith("stat/on_policy") for r in _rows(tmp_path / "zero") for k in r)
    one = _rows(tmp_path / "one")
    assert all(r["stat/on_policy"] == 1.0 for r in one)
    assert [r["loss"] for r in one] != [r["loss"] for r in default]


def test_resume_reproduces_coins_samples_and_curve(tmp_path, tiny_models, data):
    """MCW-KD (reference preset: the data pipeline's DTW cost) across tokenizers with ratio 0.5:
    a run stopped after 2 of 4 steps and resumed gives the uninterrupted run's coins, samples
    (their token counts and statistics) and losses."""
    s, t = tiny_models("gpt2"), tiny_models("qwen", seed=1)  # dropout on: RNG state restored too
    run = ["mcw_kd", "--mcw-preset", "reference", "--mcw-top-k", "20", "--total-iters", "4",
           "--gradient-accumulation-steps", "2", "--on-policy-ratio", "0.5", "--interval-unit", "step",
           "--save-interval", "1"]
    assert run_distillation(_argv(s, t, data, tmp_path / "ref", *run)) == 0
    out = tmp_path / "resumed"
    assert run_distillation(_argv(s, t, data, out, *run, "--max-steps", "2")) == 0
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert run_distillation(_argv(s, t, data, out, *run, "--resume")) == 0
    keys = ("loss", "kd_loss", "tokens", *STATS)
    ref, got = _curve(tmp_path / "ref", keys), _curve(out, keys)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    on = [r["stat/on_policy"] for r in ref]
    assert 0 < sum(on) < len(on) and any(0 < x < 1 for x in on)  # a mix of batches
    for a, b in zip(ref, got):
        assert {k: a[k] for k in ("tokens", *STATS)} == {k: b[k] for k in ("tokens", *STATS)}
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0)
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=1e-6, abs=0)


def test_deepspeed_zero2_trains_on_policy(tmp_path, tiny_models, data):
    """One process under DeepSpeed ZeRO-2 (parameters whole on every rank): ULD with every
    micro-batch on-policy."""
    pytest.importorskip("deepspeed")
    from test_on_policy import eos_prone_copy

    student = eos_prone_copy(tiny_models("gpt2"), tmp_path / "student")
    argv = _argv(student, tiny_models("qwen", seed=1), data, tmp_path / "run",
                 "universal_logit_distillation", "--total-iters", "2", "--on-policy-ratio", "1",
                 "--deepspeed", "--deepspeed_config",
                 str(ROOT / "configs" / "deepspeed" / "ds_config_zero2_fp32.json"))
    assert run_distillation(argv) == 0
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["stat/on_policy"] == 1.0 and r["loss"] > 0 for r in rows)


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch(launcher, argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "code"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    res = subprocess.run([*launcher, *argv], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["torchrun", "zero3"])
def test_two_ranks_train_on_policy(tmp_path, tiny_models, mined_map, data, engine):
    """2 ranks (gloo) with every micro-batch on-policy, MinED (its alignment index computed on the
    fly); ZeRO-3 partitions the student, so the ranks generate in lock step while their samples
    end at different lengths (an eos-prone student: some samples finish early, some at the
    limit)."""
    from test_on_policy import eos_prone_copy

    mapping = mined_map("tiny-qwen", "tiny-gpt2")
    student = eos_prone_copy(tiny_models("gpt2"), tmp_path / "student")
    argv = _argv(student, tiny_models("qwen", seed=1), data, tmp_path / "run",
                 "min_edit_dis_kld", "--teacher-to-student-id-mapping", str(mapping), "--total-iters", "2",
                 "--on-policy-ratio", "1", "--save-interval", "0")
    entry = str(ROOT / "code" / "distillation.py")
    if engine == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", _port(), entry]
    else:
        pytest.importorskip("deepspeed")
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
        launcher = ["deepspeed", "--num_gpus", "2", "--master_port", _port(), entry]
        argv += ["--deepspeed", "--deepspeed_config", str(ds)]
    _launch(launcher, argv)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["stat/on_policy"] == 1.0 and r["loss"] > 0 and r["kd_loss"] > 0
        assert 0.0 < r["aligned_fraction"] <= 1.0
    finished = [r["stat/on_policy_finished"] for r in rows]
    assert 0.0 < sum(finished) < len(finished)  # samples of different lengths on the ranks
    derived = json.loads((tmp_path / "run" / "args.json").read_text())["derived"]
    assert derived["world_size"] == 2 and derived["on_policy_max_new_tokens"] == 6
