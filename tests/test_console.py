"""The training console: the summary line, the progress bar's rules, and that the quiet console
loses no metric (metrics.jsonl and TensorBoard keep every key)."""
from __future__ import annotations

import io
import logging
import re

import pytest

import test_train_support as sup
from mckd.config import parse_config
from mckd.train.console import Progress, format_duration, summary_line
from mckd.train.loop import Trainer, run

LINE = re.compile(r"^train \| step \d+/\d+ \| epoch \d+\.\d\d \| loss \S+ \| .* \| [\d,]+ tok/s \| eta \S+$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 44.6, 60, 192, 3599, 3600, 7500)] == [
        "0s", "45s", "1m00s", "3m12s", "59m59s", "1h00m", "2h05m"]
    assert format_duration(None) == format_duration(float("nan")) == format_duration(-1) == "?"


def test_summary_line_fields_and_order():
    rec = {"step": 150, "epoch": 0.6234, "accuracy": 0.51234, "kd_loss": 0.23781, "loss": 2.34119,
           "nll_loss": 2.10342, "tokens": 13326.0, "grad_norm": 1.2345, "lr": 4.98e-4,
           "lr_last_group": 4.98e-4, "tokens_per_s": 5230.4, "stat/t2s_agreement": 0.9,
           "mcw/w_logits_l2": 0.33, "grad_norm_student": 1.2, "grad_norm_criterion": 0.1}
    line = summary_line(rec, total_steps=1200, eta_s=192)
    assert line == ("train | step 150/1200 | epoch 0.62 | loss 2.3412 | ce 2.1034 | kd 0.2378 | "
                    "acc 0.512 | lr 4.98e-04 | grad 1.23 | 5,230 tok/s | eta 3m12s")
    assert LINE.match(line)


def test_summary_line_leaves_out_what_the_criterion_does_not_report():
    rec = {"step": 3, "epoch": 1.0, "loss": 4.5, "tokens": 100.0, "grad_norm": 2.0, "lr": 1e-3,
           "tokens_per_s": 12.0}
    line = summary_line(rec, total_steps=3)
    assert line == "train | step 3/3 | epoch 1.00 | loss 4.5000 | lr 1.00e-03 | grad 2 | 12 tok/s | eta ?"
    assert " ce " not in line and " kd " not in line and " acc " not in line


def test_bar_off_rank_zero_and_off_a_terminal():
    for kwargs in ({"enabled": False, "file": _Terminal()}, {"enabled": True, "file": io.StringIO()}):
        p = Progress(10, **kwargs)
        assert not p.active
        p.step(1.0, 1e-3)
        p.close()
        assert kwargs["file"].getvalue() == ""


def test_bar_on_a_terminal_shows_progress_and_log_records_pass_through():
    term = _Terminal()
    root = logging.getLogger()
    console = logging.StreamHandler(term)
    root.addHandler(console)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        p = Progress(4, initial=1, file=term)
        assert p.active
        p.step(2.5, 1e-3)
        line = p.log({"step": 2, "epoch": 0.5, "loss": 2.5, "nll_loss": 2.25, "lr": 1e-3,
                      "grad_norm": 1.0, "tokens_per_s": 100.0})
        logging.getLogger("mckd.train").info(line)
        p.step(2.0, 5e-4)
        assert p.eta(3) is not None and p.eta(3) >= 0
        p.close()
    finally:
        root.removeHandler(console)
        root.setLevel(old_level)
    out = term.getvalue()
    assert "3/4" in out and "loss=2.0000" in out and "ce=2.2500" in out and "tok/s=100" in out
    assert line in out  # the record went through tqdm.write, not lost or torn
    assert root.handlers.count(console) == 0 and all(type(h).__name__ != "_TqdmLoggingHandler"
                                                     for h in root.handlers)


@pytest.mark.slow
def test_quiet_console_keeps_every_metric(tiny_models, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen: set[str] = set()
    accumulate = Trainer._accumulate

    def spy(acc, out):  # the criterion's own metric keys, as the loop receives them
        seen.update(out.metrics)
        accumulate(acc, out)

    monkeypatch.setattr(Trainer, "_accumulate", staticmethod(spy))
    data = sup.write_data(tmp_path / "data", n_train=8, n_dev=2)
    student, teacher = tiny_models("gpt2"), tiny_models("gpt2", seed=1)
    out = tmp_path / "kd"
    run(parse_config(sup.train_argv(student, data, out, "--total-iters", "2", "--teacher-model-path",
                                    str(teacher), "--eval-interval", "0", criterion="test_kd")))
    recs = [r for r in sup.read_jsonl(out / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in recs] == [1, 2]
    loop_keys = {"step", "epoch", "loss", "tokens", "grad_norm", "lr", "lr_last_group", "tokens_per_s"}
    assert {"kd_loss", "stat/hidden_norm"} <= seen
    for r in recs:
        assert loop_keys | seen <= set(r), sorted(loop_keys | seen - set(r))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in recs[0] if k != "step"}
    lines = [ln.split("mckd.train: ", 1)[1] for ln in (out / "train.log").read_text().splitlines()
             if "mckd.train: train |" in ln]
    assert len(lines) == 2 and all(LINE.match(ln) for ln in lines), lines
    assert all(len(ln) < 160 and "stat/" not in ln and "=" not in ln for ln in lines)
    assert lines[-1].startswith("train | step 2/2 |") and "kd " in lines[-1]
