"""--resume after a SIGKILL reproduces the uninterrupted loss curve; partial checkpoints are ignored."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import test_train_support as sup
from mckd.train import checkpoint as ckpt_io

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}:{ROOT / 'code'}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _cmd(model, data, out, *extra):
    return [sys.executable, "-m", "test_train_support",
            *sup.train_argv(model, data, out, "--total-iters", "6", "--interval-unit", "step",
                            "--save-interval", "1", "--eval-interval", "0",
                            "--keep-best-n-checkpoints", "2", *extra)]


def _losses(out):
    return {r["step"]: r["loss"] for r in sup.read_jsonl(out / "metrics.jsonl") if "split" not in r}


def test_incomplete_checkpoints_are_ignored(tmp_path):
    good = tmp_path / "epoch0_step2"
    good.mkdir()
    (good / ckpt_io.STATE_JSON).write_text("{}")
    (tmp_path / ".tmp-epoch0_step3").mkdir()  # killed while writing
    (tmp_path / "epoch0_step4").mkdir()  # no trainer_state.json: not complete
    assert ckpt_io.latest_checkpoint(tmp_path) == good


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_loss_curve(tiny_models, tmp_path):
    model = tiny_models("gpt2")  # dropout on: the RNG state must be restored too
    data = sup.write_data(tmp_path / "data", n_train=24, n_dev=2)
    ref = tmp_path / "ref"
    subprocess.run(_cmd(model, data, ref), env=_env(), check=True, capture_output=True, timeout=600)
    expected = _losses(ref)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).randint(2, 4)
    proc = subprocess.Popen(_cmd(model, data, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and max(_losses(out), default=0) >= kill_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 not in _losses(out)
    with pytest.raises(subprocess.CalledProcessError):  # refuses the non-empty directory
        subprocess.run(_cmd(model, data, out), env=_env(), check=True, capture_output=True, timeout=600)
    subprocess.run(_cmd(model, data, out, "--resume"), env=_env(), check=True, capture_output=True,
                   timeout=600)
    got = _losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    kept = [p.name for p in ckpt_io.list_checkpoints(out)]
    assert kept[-1] == "epoch1_step6" and len(kept) == 2  # no dev scores: the 2 latest
    assert not list(out.glob(".tmp-*"))
