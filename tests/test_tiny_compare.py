"""Smoke version of the tiny comparison (scripts/tiny/compare.sh -> python -m mckd.tiny.compare).

Every method trains a few steps with one seed, is evaluated on 3 test prompts, and lands in the
table, the CSV and the plots; the ranking is not checked (docs/RESULTS.md has the real run).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mckd.tiny import compare

ROOT = Path(__file__).resolve().parents[1]


def test_table_mean_std_and_sft_in_both_settings(tmp_path):
    rows = [{"setting": "both", "method": "sft", "kd_rate": None, "seed": s, "score": v}
            for s, v in ((1, 20.0), (2, 22.0), (3, 24.0))]
    rows += [{"setting": "cross", "method": "mcw_kd", "kd_rate": 0.5, "seed": s, "score": v}
             for s, v in ((1, 25.0), (2, 25.0), (3, 28.0))]
    md = compare.write_table(rows, tmp_path / "t", {"same": 40.0, "cross": 38.0}, 300)
    with open(tmp_path / "t.csv") as fh:
        table = list(csv.DictReader(fh))
    sft = [r for r in table if r["method"] == "sft"]
    assert {r["setting"] for r in sft} == {"same", "cross"}
    assert float(sft[0]["rougeL_mean"]) == pytest.approx(22.0)
    assert float(sft[0]["rougeL_std"]) == pytest.approx(2.0)       # sample std of 20, 22, 24
    mcw = next(r for r in table if r["method"] == "mcw_kd")
    assert mcw["setting"] == "cross" and float(mcw["delta_vs_sft"]) == pytest.approx(4.0)
    assert "| cross | mcw_kd | 0.5 | 3 | 26.00 ± 1.73 | +4.00 |" in md


def test_every_method_has_a_criterion_setting_and_rate():
    ms = compare.methods()
    assert [m.label for m in ms] == compare.ORDER
    assert {m.setting for m in ms if m.label != "sft"} == {"same", "cross"}
    assert all(m.kd_rate is not None and m.kd_temp for m in ms if m.label != "sft")
    assert compare.methods({"mcw_kd": 0.25})[-1].kd_rate == 0.25


def test_run_tasks_respects_dependencies_the_job_limit_and_weights():
    import threading
    import time

    lock = threading.Lock()
    log, running, peak = [], [0], [0]

    def work(name, dt=0.05):
        def fn():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                log.append(("start", name))
            time.sleep(dt)
            with lock:
                running[0] -= 1
                log.append(("end", name))
            return name
        return fn

    slow_teacher = compare.Task("slow teacher", work("slow teacher", 0.3), 10)
    fast_teacher = compare.Task("fast teacher", work("fast teacher", 0.05), 10)
    sft = compare.Task("sft", work("sft"), 1)
    heavy = compare.Task("heavy student", work("heavy student"), 5, (fast_teacher,))
    light = compare.Task("light student", work("light student"), 2, (slow_teacher,))
    ev = compare.Task("eval", work("eval"), 0.5, (heavy,))
    tasks = [sft, light, ev, heavy, slow_teacher, fast_teacher]
    compare.run_tasks(tasks, 2)
    assert peak[0] == 2 and all(t.result == t.name for t in tasks)
    pos = {(kind, n): k for k, (kind, n) in enumerate(log)}
    for t in tasks:
        for a in t.after:
            assert pos[("end", a.name)] < pos[("start", t.name)]
    # the students of the fast teacher do not wait for the slow one, and the heaviest ready goes first
    assert pos[("start", "heavy student")] < pos[("end", "slow teacher")]
    assert pos[("start", "heavy student")] < pos[("start", "sft")]


def test_run_tasks_raises_the_first_failure_and_unknown_dependencies():
    def boom():
        raise ValueError("stage failed")

    with pytest.raises(ValueError, match="stage failed"):
        compare.run_tasks([compare.Task("a", boom), compare.Task("b", lambda: 1)], 2)
    ghost = compare.Task("ghost", lambda: 0)
    with pytest.raises(RuntimeError, match="wait on tasks not in the list"):
        compare.run_tasks([compare.Task("orphan", lambda: 0, after=(ghost,))], 2)


@pytest.mark.slow
def test_compare_smoke_every_method_trains_and_evaluates(tmp_path):
    out = tmp_path / "compare"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "code"), "BATCH_SIZE": "4", "LOG_INTERVAL": "1",
           "EVAL_GEN": "0"}  # no dev generation: checkpoints ranked by dev loss
    cmd = [sys.executable, "-m", "mckd.tiny.compare", "compare", "--out", str(out),
           "--teacher-out", str(tmp_path / "teachers"), "--jobs", "2", "--seeds", "1",
           "--eval-seeds", "10", "--eval-num", "3", "--max-new-tokens", "8",
           "--teacher-epoch", "1", "--student-epoch", "1",
           "--teacher-args", "--max-steps 2 --dev-num 2 --max-new-tokens 4",
           "--train-args", "--max-steps 2 --dev-num 2 --max-new-tokens 4", "--log-level", "WARNING"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "table.csv") as fh:
        table = list(csv.DictReader(fh))
    got = {(r["setting"], r["method"]) for r in table}
    want = {("same", "teacher"), ("cross", "teacher"), ("same", "sft"), ("cross", "sft")}
    want |= {(setting, label) for label, (_, setting, _) in compare.CRITERIA.items()}
    assert got == want
    with open(out / "scores.csv") as fh:
        scores = list(csv.DictReader(fh))
    assert sorted(r["method"] for r in scores) == sorted(compare.ORDER)
    for r in scores:
        assert 0.0 <= float(r["score"]) <= 100.0
        args = json.loads((Path(r["ckpt"]).parent / "args.json").read_text())
        assert args["train"]["seed"] == 1
        if r["method"] != "sft":
            assert args["criterion_args"]["kd_rate"] == pytest.approx(float(r["kd_rate"]))
    for png in ("loss_curves.png", "scores.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timing = json.loads((out / "timing.json").read_text())
    assert timing["total_s"] >= timing["longest_teacher_s"] >= 0
    assert {f"{m} seed 1" for m in compare.ORDER} <= set(timing["stages_s"])
    summed = sum(timing["stages_s"].values())     # of rounded values
    assert abs(timing["training_s_summed_over_stages"] - summed) <= len(timing["stages_s"]) and summed > 0
