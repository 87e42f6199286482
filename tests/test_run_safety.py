"""Trustworthy runs: safe checkpoint loading, one writer per run directory, pinned evaluation,
divergence caught, --overwrite / --resume hygiene, Ctrl-C / SIGTERM, and the run state."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import test_train_support as sup
from conftest import run_distillation
from mckd.train import checkpoint as ckpt_io
from mckd.train import rundir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sup.write_data(tmp_path_factory.mktemp("data"), n_train=16, n_dev=2)


def _argv(model, data, out, *extra, criterion="cross_entropy"):
    return sup.train_argv(model, data, out, "--interval-unit", "step", "--save-interval", "1",
                          "--eval-interval", "0", "--keep-best-n-checkpoints", "1", *extra,
                          criterion=criterion)


def _train_steps(out):
    return [r["step"] for r in sup.read_jsonl(out / "metrics.jsonl") if "split" not in r]


# --------------------------------------------------------------------------- safe loading
class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_files_are_refused(tiny_models, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(tiny_models("gpt2"), data, out, "--total-iters", "3")
    assert run_distillation([*argv, "--max-steps", "2"]) == 0
    ckpt = ckpt_io.latest_checkpoint(out)
    marker = tmp_path / "pwned"
    for name in ("trainer_state.pt", "criterion.pt", "rng/rank0.pt"):
        original = (ckpt / name).read_bytes()
        torch.save({"optimizer": _Evil(marker)}, ckpt / name)
        with pytest.raises(ckpt_io.UnsafeCheckpointError, match="refused to load"):
            ckpt_io.safe_load(ckpt / name)
        if name == "trainer_state.pt":  # the whole command line
            rc = run_distillation([*argv, "--resume"])
            err = capsys.readouterr().err
            assert rc == 2 and f"{ckpt / name}: refused to load" in err, err[-1500:]
            assert not (out / "args.resume.json").exists()
        assert not marker.exists()  # the payload never ran
        (ckpt / name).write_bytes(original)
    # the untouched checkpoint resumes
    assert run_distillation([*argv, "--resume"]) == 0
    assert _train_steps(out) == [1, 2, 3]


def test_rng_state_round_trips_and_legacy_numpy_state_loads(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(ckpt_io.rng_state(), tmp_path / "new.pt")
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(legacy, tmp_path / "legacy.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    for f in ("new.pt", "legacy.pt"):
        ckpt_io.set_rng_state(ckpt_io.safe_load(tmp_path / f))
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_deepspeed_files_are_scanned_before_deepspeed_reads_them(tmp_path):
    d = tmp_path / "deepspeed"
    d.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, d / "mp_rank_00_model_states.pt")
    ckpt_io.check_deepspeed_files(d)
    torch.save({"optimizer_state_dict": _Evil(tmp_path / "pwned")}, d / "zero_pp_rank_0_optim_states.pt")
    with pytest.raises(ckpt_io.UnsafeCheckpointError, match="system"):
        ckpt_io.check_deepspeed_files(d)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- the lock
def test_lock_names_holder_and_stale_lock_is_taken_over(tmp_path, caplog):
    with rundir.RunLock(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(rundir.RunDirError, match=f"in use by PID {os.getpid()} on {holder['host']}"):
            rundir.RunLock(tmp_path).acquire()
    assert not (tmp_path / rundir.LOCK_NAME).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rundir.LOCK_NAME).write_text(json.dumps({**holder, "pid": dead.pid}))
    with rundir.RunLock(tmp_path):
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(dead.pid) in caplog.text


@pytest.mark.slow
def test_one_writer_then_sigterm_saves_resumable_state(tiny_models, data, tmp_path, capsys):
    """A second run or resume on a busy directory is refused naming the holder; SIGTERM stops the
    holder within seconds with a resumable checkpoint; the resume finishes one clean curve."""
    model = tiny_models("gpt2")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}:{ROOT / 'code'}", OMP_NUM_THREADS="1")
    argv = _argv(model, data, out, "--total-iters", "400", "--save-interval", "1000")
    proc = subprocess.Popen([sys.executable, "-m", "test_train_support", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (
            (out / "metrics.jsonl").exists() and len(_train_steps(out)) >= 3):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    before = (out / "args.json").read_text()
    for extra in ((), ("--resume",)):
        assert run_distillation([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert f"in use by PID {proc.pid}" in err, err[-1500:]
    assert (out / "args.json").read_text() == before and not (out / "args.resume.json").exists()
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    stopped_in = time.time() - t0
    err = proc.stderr.read()
    # a step, a checkpoint save and the interpreter's exit: seconds on a quiet machine (the bound
    # leaves room for a loaded one)
    assert rc == 130 and stopped_in < 60, (rc, stopped_in, err[-2000:])
    assert "resumable state in" in err and "--resume" in err
    assert ckpt_io.run_state(out).status == "unfinished"
    saved = ckpt_io.latest_checkpoint(out)
    step = int(saved.name.split("step")[1])
    assert step >= 3 and not (out / rundir.LOCK_NAME).exists()
    assert run_distillation([*argv, "--max-steps", str(step + 2), "--resume"]) == 0
    steps = _train_steps(out)
    assert steps == list(range(1, step + 3))
    resumed = json.loads((out / "args.resume.json").read_text())
    assert resumed["train"]["max_steps"] == step + 2
    assert resumed["derived"]["resume_changes"] == [f"--max-steps None -> {step + 2}"]
    assert ckpt_io.run_state(out).status == "finished"


# --------------------------------------------------------------------------- evaluation pin
def _fake_ckpt(d: Path, name: str, loss: float) -> Path:
    p = d / name
    p.mkdir(parents=True)
    (p / ckpt_io.STATE_JSON).write_text(json.dumps({"dev": {"loss": loss}}))
    return p


def test_pruning_skips_a_checkpoint_being_evaluated(tmp_path):
    worst = _fake_ckpt(tmp_path, "epoch0_step1", 9.0)
    _fake_ckpt(tmp_path, "epoch0_step2", 1.0)
    nan = _fake_ckpt(tmp_path, "epoch0_step3", float("nan"))
    _fake_ckpt(tmp_path, "epoch0_step4", 5.0)
    with rundir.pin_checkpoint(worst):
        deleted = ckpt_io.prune_checkpoints(tmp_path, 1, higher_is_better=False, score_key="loss")
        assert deleted == [nan] and worst.is_dir()  # NaN ranks last; the pinned one stays
    assert not (worst / rundir.READERS).exists()
    ckpt_io.prune_checkpoints(tmp_path, 1, higher_is_better=False, score_key="loss")
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["epoch0_step2", "epoch0_step4"]
    import shutil

    with pytest.raises(rundir.RunDirError, match="disappeared"):
        with rundir.pin_checkpoint(tmp_path / "epoch0_step4"):
            shutil.rmtree(tmp_path / "epoch0_step4")
    with pytest.raises(rundir.RunDirError, match="disappeared"):
        with rundir.pin_checkpoint(tmp_path / "epoch0_step1"):
            pass


def test_find_checkpoint_never_returns_non_finite_metrics(tmp_path):
    _fake_ckpt(tmp_path / "run", "epoch1_step1", float("nan"))
    res = subprocess.run([sys.executable, str(ROOT / "scripts/lib/find_checkpoint.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout == ""
    good = _fake_ckpt(tmp_path / "run", "epoch0_step0", 3.0)
    res = subprocess.run([sys.executable, str(ROOT / "scripts/lib/find_checkpoint.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.stdout.strip() == str(good)


# --------------------------------------------------------------------------- divergence
def test_divergence_monitor_tolerates_early_spikes():
    from mckd.train.guards import DivergenceMonitor

    m = DivergenceMonitor(10.0, 3)
    assert all(m.update(x) is None for x in (7.0, 30.0, 60.0, 6.0, 69.0, 5.0))  # spikes, not 3 in a row
    assert m.update(500.0) is None and m.update(900.0) is None
    assert "diverged" in m.update(1e4)
    off = DivergenceMonitor(0.0, 3)
    assert all(off.update(x) is None for x in (1.0, 1e6, 1e9, 1e12))


def test_on_policy_steps_have_their_own_divergence_monitor():
    """On-policy steps train the KD terms only, so their loss is far below a step with the CE: a
    KD-only step followed by ordinary steps is no divergence, while a real blow-up in either kind
    still stops the run; mixed steps are not checked; the state resumes both monitors."""
    from mckd.train.guards import StepDivergence

    g = StepDivergence(10.0, 3, {}, on_policy=True)
    assert g.update(0.24, "on") is None                           # CE-free on-policy step first
    assert all(g.update(6.8, "off") is None for _ in range(3))    # no false alarm
    assert all(g.update(0.2, "on") is None for _ in range(3))
    assert g.update(1e6, "mixed") is None
    assert g.update(50.0, "on") is None and g.update(60.0, "on") is None
    assert "diverged" in g.update(70.0, "on")
    st = g.state()
    assert set(st) == {"loss_mean", "far_streak", "loss_mean_on_policy", "far_streak_on_policy"}
    resumed = StepDivergence(10.0, 3, st, on_policy=True)
    assert resumed.state() == st
    assert set(StepDivergence(10.0, 3, {}).state()) == {"loss_mean", "far_streak"}   # off-policy runs
    off = StepDivergence(10.0, 3, {})
    assert off.update(2.0) is None and off.update(50.0) is None and off.update(60.0) is None
    assert "diverged" in off.update(70.0)


def test_too_large_learning_rate_stops_the_run(tiny_models, data, tmp_path, capsys):
    out = tmp_path / "div"
    rc = run_distillation(_argv(tiny_models("gpt2"), data, out, "--total-iters", "12", "--lr", "3",
                                "--clip-grad", "0", "--save-interval", "20"))
    err = capsys.readouterr().err
    assert rc == 1 and "stopped: step" in err and "the loss diverged" in err and "Traceback" not in err
    assert "last good checkpoint: none" in err
    assert ckpt_io.list_checkpoints(out) == [] and ckpt_io.run_state(out).status == "diverged"
    losses = [r["loss"] for r in sup.read_jsonl(out / "metrics.jsonl")]
    assert losses[-1] > 10 * losses[0]  # the diverged step is logged
    off = tmp_path / "off"
    assert run_distillation(_argv(tiny_models("gpt2"), data, off, "--total-iters", "6", "--lr", "3",
                                  "--clip-grad", "0", "--divergence-threshold", "0")) == 0


def test_non_finite_dev_metrics_stop_without_a_checkpoint(tiny_models, data, tmp_path, monkeypatch, capsys):
    from mckd.train import dev_eval

    real = dev_eval.teacher_forced
    calls = []

    def fake(*a, **kw):
        calls.append(1)
        res = real(*a, **kw)
        return {**res, "loss": float("nan")} if len(calls) >= 2 else res

    monkeypatch.setattr(dev_eval, "teacher_forced", fake)
    out = tmp_path / "devnan"
    rc = run_distillation(_argv(tiny_models("gpt2"), data, out, "--total-iters", "3", "--eval-interval", "1",
                                "--keep-best-n-checkpoints", "3"))
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite dev metrics (loss)" in err
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["epoch0_step1"]
    assert str(out / "epoch0_step1") in err and ckpt_io.run_state(out).status == "diverged"


def test_non_finite_weights_are_never_saved(tiny_models, data, tmp_path, capsys):
    sup.PoisonAt.calls, sup.PoisonAt.call = 0, 4  # first micro-batch of step 3
    out = tmp_path / "poison"
    rc = run_distillation(_argv(tiny_models("gpt2"), data, out, "--total-iters", "8", "--nan-patience", "2",
                                criterion="test_poison"))
    sup.PoisonAt.call = 10 ** 9
    err = capsys.readouterr().err
    assert rc == 1 and "not finite and were not saved" in err
    names = [p.name for p in out.iterdir() if p.name.startswith("epoch")]
    assert not any("nan-abort" in n for n in names)
    for ckpt in ckpt_io.list_checkpoints(out):  # what is on disk is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())
    assert ckpt_io.run_state(out).status == "diverged"


# --------------------------------------------------------------------------- overwrite / resume hygiene
def test_overwrite_moves_the_old_run_aside(tiny_models, data, tmp_path):
    out = tmp_path / "run"
    model = tiny_models("gpt2")
    assert run_distillation(_argv(model, data, out, "--total-iters", "2")) == 0
    assert run_distillation(_argv(model, data, out, "--total-iters", "1", "--overwrite")) == 0
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and [p.name for p in ckpt_io.list_checkpoints(old[0])] == ["epoch0_step2"]
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["epoch0_step1"]
    assert _train_steps(out) == [1] and _train_steps(old[0]) == [1, 2]


def test_resume_refuses_changed_settings_and_tolerates_a_torn_metrics_line(tiny_models, data, tmp_path, capsys):
    out = tmp_path / "run"
    model = tiny_models("gpt2")
    assert run_distillation(_argv(model, data, out, "--total-iters", "2", "--max-steps", "1")) == 0
    ckpt_io.write_run_state(out, "running", step=1)  # as if killed after the step-1 checkpoint
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 3.1')  # torn by the kill
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rc = run_distillation(_argv(model, data, out, "--total-iters", "2", "--lr", "5e-3", "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and "--lr 0.001 -> 0.005" in err and "args.json" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot
    assert run_distillation(_argv(model, data, out, "--total-iters", "2", "--resume")) == 0
    assert _train_steps(out) == [1, 2]
    assert ckpt_io.run_state(out).status == "finished"


def test_resume_without_checkpoint_starts_a_fresh_metrics_file(tiny_models, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 2, "loss": 98.0}\n')
    ckpt_io.write_run_state(out, "failed", step=2)
    assert run_distillation(_argv(tiny_models("gpt2"), data, out, "--total-iters", "1", "--resume")) == 0
    recs = sup.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1] and recs[0]["loss"] != 99.0


def test_full_disk_is_a_clear_error(tiny_models, data, tmp_path, monkeypatch, capsys):
    import shutil as _shutil

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(1, 1, 1024))
    out = tmp_path / "full"
    rc = run_distillation(_argv(tiny_models("gpt2"), data, out, "--total-iters", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "not enough disk space for a checkpoint" in err and "MiB free" in err
    assert not out.exists()  # nothing was saved, so the run left nothing behind


# --------------------------------------------------------------------------- run state
def test_run_state_of_a_directory(tmp_path):
    d = tmp_path / "run"
    assert ckpt_io.run_state(d).status == "empty"
    d.mkdir()
    (d / "console.log").write_text("launcher output\n")
    assert ckpt_io.run_state(d).status == "empty"
    (d / "args.json").write_text("{}")
    assert ckpt_io.run_state(d).status == "unfinished"  # started, never recorded an end
    for recorded, status in (("running", "unfinished"), ("interrupted", "unfinished"),
                             ("failed", "unfinished"), ("diverged", "diverged"), ("finished", "finished")):
        ckpt_io.write_run_state(d, recorded, step=3, message="why")
        st = ckpt_io.run_state(d)
        assert (st.status, st.recorded, st.step) == (status, recorded, 3)
    res = subprocess.run([sys.executable, "-m", "mckd.train.rundir", "state", str(d)], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "code")))
    assert res.stdout.strip() == "finished"


def test_a_new_run_failing_before_its_first_checkpoint_leaves_nothing(tiny_models, data, tmp_path, monkeypatch):
    from mckd.config import parse_config
    from mckd.train import loop

    def boom(self, micro, acc):
        raise RuntimeError("out of memory at step 1")

    out = tmp_path / "run"
    argv = _argv(tiny_models("gpt2"), data, out, "--total-iters", "1")
    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "_step", boom)
        with pytest.raises(RuntimeError, match="out of memory"):
            loop.run(parse_config(argv))
    assert not out.exists()  # the corrected command runs again without --overwrite or --resume
    assert run_distillation(argv) == 0 and _train_steps(out) == [1]
    assert (out / "train.log").read_text().count("training done") == 1


def test_a_write_failure_on_a_full_disk_is_named(tmp_path, monkeypatch):
    import errno
    import shutil as _shutil

    err = rundir.no_space_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x")
    assert err is not None and "disk full while writing" in str(err)
    torch_style = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert rundir.no_space_error(torch_style, tmp_path / "x") is None  # plenty of space here
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(1, 1, 1024))
    assert "disk full" in str(rundir.no_space_error(torch_style, tmp_path / "x"))
    assert rundir.no_space_error(RuntimeError("shape mismatch"), tmp_path / "x") is None
