"""The tiny comparison (scripts/tiny/compare.py): method table, paired statistics, task graph, and a
smoke run in which SFT, a same-vocabulary method, two cross-vocabulary methods and their
same-teacher controls train a few steps with two seeds, are evaluated on 3 test prompts and land in
the table, the CSV and the plots (the ranking is not checked; docs/RESULTS.md has the real run;
every criterion runs end to end in tests/test_criteria_e2e.py).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "tiny"))
import compare  # noqa: E402  (scripts/tiny/compare.py)


def _row(method, setting, seed, rouge, greedy, nll, kd_rate=""):
    return {"method": method, "setting": setting, "seed": seed, "kd_rate": kd_rate, "rougeL": rouge,
            "rougeL_greedy": greedy, "test_nll": nll}


def test_table_gives_paired_differences_with_intervals(tmp_path):
    seeds = [10, 20, 30, 40, 50]
    sft = [20.0, 22.0, 24.0, 21.0, 23.0]
    kd = [x + d for x, d in zip(sft, [1.0, 2.0, 1.5, 1.0, 2.5])]   # paired gains, small spread
    noisy = [x + d for x, d in zip(sft, [3.0, -3.0, 2.0, -2.0, 0.5])]
    rows = [_row("teacher", "same", "", 40.0, 41.0, 1.2)]
    rows += [_row("sft", "both", s, v, v - 1, 2.0 - v / 100) for s, v in zip(seeds, sft)]
    rows += [_row("vanilla_kd", "same", s, v, v - 1, 2.0 - v / 100, 0.5) for s, v in zip(seeds, kd)]
    rows += [_row("uld", "cross", s, v, v - 1, 2.0 - v / 100, 0.5) for s, v in zip(seeds, noisy)]
    md = compare.write_table(rows, tmp_path / "t", n_eval=300, n_sampling=3)
    with open(tmp_path / "t.csv") as fh:
        table = {(r["setting"], r["method"]): r for r in csv.DictReader(fh)}
    assert {k for k in table if k[1] == "sft"} == {("same", "sft"), ("cross", "sft")}
    vk, ul = table[("same", "vanilla_kd")], table[("cross", "uld")]
    assert float(vk["rougeL_diff"]) == pytest.approx(1.6)
    # t interval of the paired differences (t_{0.975,4} = 2.776, sd 0.652)
    assert float(vk["rougeL_lo"]) == pytest.approx(1.6 - 2.776 * 0.6519 / 5 ** 0.5, abs=2e-3)
    assert float(vk["rougeL_lo"]) > 0                      # the gain is seen
    assert float(ul["rougeL_lo"]) < 0 < float(ul["rougeL_hi"])   # within noise
    assert float(vk["test_nll_diff"]) == pytest.approx(-0.016)
    assert "| vanilla_kd | 0.5 | 5 |" in md and "+1.60 [" in md and "]*" in md
    assert "Smallest effect this design detects" in md



def test_table_pairs_each_control_with_its_cross_vocabulary_run(tmp_path):
    seeds = [10, 20, 30]
    rows = [_row("sft", "both", s, 20.0, 19.0, 2.0) for s in seeds]
    rows += [_row("uld", "cross", s, v, 19.0, 2.0, 0.5) for s, v in zip(seeds, [19.0, 21.0, 20.0])]
    rows += [_row("uld@same", "same", s, v, 19.0, 1.9, 0.5) for s, v in zip(seeds, [22.0, 23.5, 23.0])]
    rows += [_row("mined@same", "same", s, 21.0, 19.0, 1.9, 0.5) for s in seeds]   # no cross run
    md = compare.write_table(rows, tmp_path / "t", n_eval=300, n_sampling=3)
    with open(tmp_path / "t.csv") as fh:
        mismatch = [r for r in csv.DictReader(fh) if r["setting"] == "mismatch"]
    assert [r["method"] for r in mismatch] == ["uld"]        # differences 3.0, 2.5, 3.0
    assert float(mismatch[0]["rougeL_diff"]) == pytest.approx(8.5 / 3, abs=1e-4)
    assert float(mismatch[0]["rougeL_lo"]) > 0 and float(mismatch[0]["test_nll_diff"]) == pytest.approx(-0.1)
    assert "cost of the vocabulary mismatch" in md and "| uld | 3 | +2.83 [" in md

def test_paired_difference_matches_a_hand_computed_interval():
    from mckd.evaluation.stats import detectable_effect, paired_difference

    d = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 2.0])   # differences 2, 3, 2
    assert d.mean == pytest.approx(7 / 3) and d.sd == pytest.approx(0.57735, abs=1e-5)
    half = 4.302653 * 0.57735 / 3 ** 0.5                      # t_{0.975, 2}
    assert (d.lo, d.hi) == (pytest.approx(7 / 3 - half, abs=1e-4), pytest.approx(7 / 3 + half, abs=1e-4))
    assert d.excludes_zero
    # more seeds or less spread detect smaller effects
    assert detectable_effect(1.0, 10) < detectable_effect(1.0, 5) < detectable_effect(2.0, 5)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [1.0, 2.0])


def test_methods_table_is_read_and_every_method_has_a_grid():
    table = compare.read_methods()
    assert list(table)[0] == "sft" and table["sft"].kd_rate is None
    assert {m.setting for m in table.values() if m.label != "sft"} == {"same", "cross"}
    assert set(compare.GRID) == set(table)
    counts = {label: len(compare.grid_points(label, table[label])) for label in table}
    assert len(set(counts.values())) == 1, counts            # equal tuning budget
    ctl = compare.control(table["uld"])
    assert ctl.label == "uld@same" and ctl.setting == "same" and ctl.criterion == table["uld"].criterion


def test_choose_takes_each_methods_best_dev_point_into_the_table(tmp_path, monkeypatch, capsys):
    tsv = tmp_path / "methods.tsv"
    tsv.write_text(compare.METHODS_TSV.read_text())
    monkeypatch.setattr(compare, "METHODS_TSV", tsv)
    table = compare.read_methods(tsv)
    uld = compare.grid_points("uld", table["uld"])
    dskd = compare.grid_points("dskd", table["dskd"])
    scores = {uld[0].label: 30.0, uld[1].label: 29.0, uld[2].label: 31.5,      # the knob's point wins
              dskd[0].label: 25.0, dskd[1].label: 27.0, dskd[2].label: 26.0}   # kd_rate 0.9, T = 2
    with open(tmp_path / "tune.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "setting", "rougeL"])
        w.writeheader()
        w.writerow({"method": "teacher", "setting": "same", "rougeL": 99.0})
        w.writerows({"method": k, "setting": "x", "rougeL": v} for k, v in scores.items())
    compare.main(["choose", "--tune-csv", str(tmp_path / "tune.csv"), "--write"])
    after = compare.read_methods(tsv)
    assert after["uld"].kd_rate == 0.9 and after["uld"].flags == "--loss-combination additive"
    assert after["dskd"].kd_rate == 0.9 and after["dskd"].kd_temp == 2.0 and after["dskd"].flags == ""
    untouched = [k for k in table if k not in ("uld", "dskd")]
    assert all(after[k] == table[k] for k in untouched)
    # a chosen knob value in the table does not leak into the next grid
    assert [q.flags for q in compare.grid_points("uld", after["uld"])] == [q.flags for q in uld]
    assert "uld: uld__kd-rate_0.9__loss-combination_additive" in capsys.readouterr().out


def test_methods_table_errors_name_the_line(tmp_path):
    bad = tmp_path / "m.tsv"
    bad.write_text("# header\nsft cross_entropy - - -\n")
    with pytest.raises(ValueError, match=r"m.tsv:2: expected 6 columns"):
        compare.read_methods(bad)


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


def test_run_tasks_counts_the_cores_a_task_occupies():
    """A two-thread task holds both cores of ``jobs=2``: nothing runs beside it; the one-thread
    tasks behind it then run two at a time."""
    import threading
    import time

    lock, busy, peak, log = threading.Lock(), [0], [0], []

    def work(name, threads, dt=0.05):
        def fn():
            with lock:
                busy[0] += threads
                peak[0] = max(peak[0], busy[0])
                log.append(("start", name, busy[0]))
            time.sleep(dt)
            with lock:
                busy[0] -= threads
                log.append(("end", name, busy[0]))
        return fn

    teacher = compare.Task("teacher", work("teacher", 2, 0.2), 10, threads=2)
    sft = [compare.Task(f"sft{k}", work(f"sft{k}", 1), 1) for k in range(3)]
    kd = compare.Task("kd", work("kd", 1), 5, (teacher,))
    compare.run_tasks([*sft, kd, teacher], 2)
    assert peak[0] == 2
    assert log[0][:2] == ("start", "teacher") and log[1][:2] == ("end", "teacher")  # alone
    assert max(b for kind, _, b in log if kind == "start" and _ != "teacher") == 2  # then two at a time
    compare.run_tasks([compare.Task("wide", work("wide", 2), threads=4)], 2)  # clamped to the cores


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
    """The comparison in a copy of the project (its own small build of the embedded default): SFT,
    a cross-vocabulary method, its same-vocabulary control and its on-policy variant, two paired
    seeds, scores, table (with the cost of the mismatch) and figures."""
    copy = tmp_path / "project"
    for d in ("scripts", "code", "configs"):
        shutil.copytree(ROOT / d, copy / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "compare"
    env = {**os.environ, "PYTHONPATH": str(copy / "code"), "BATCH_SIZE": "4", "LOG_INTERVAL": "1"}
    cmd = [sys.executable, str(copy / "scripts/tiny/compare.py"), "compare", "--out", str(out),
           "--teacher-out", str(tmp_path / "teachers"), "--jobs", "2", "--seeds", "1", "2",
           "--eval-seeds", "10", "20", "--eval-num", "3", "--max-new-tokens", "8",
           "--teacher-epoch", "1", "--max-epochs", "1", "--controls",
           "--methods", "sft", "mcw_kd", "--on-policy", "mcw_kd",
           "--build-args", "--teacher-train-size 64 --train-size 32 --dev-size 8 --test-size 8",
           "--teacher-args", "--max-steps 2 --dev-num 2", "--train-args", "--max-steps 2 --dev-num 2",
           "--log-level", "WARNING"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = compare.read_methods()
    with open(out / "scores.csv") as fh:
        scores = list(csv.DictReader(fh))
    students = [r for r in scores if r["method"] != "teacher"]
    want = {"sft", "mcw_kd", "mcw_kd@same", "mcw_kd+on_policy"}
    assert {r["method"] for r in students} == want and len(students) == 2 * len(want)
    assert {r["setting"] for r in scores if r["method"] == "teacher"} == {"same", "cross"}
    for r in students:
        assert 0.0 <= float(r["rougeL"]) <= 100.0 and 0.0 <= float(r["rougeL_greedy"]) <= 100.0
        assert len(r["rougeL_per_seed"].split()) == 2 and float(r["test_nll"]) > 0
        args = json.loads((Path(r["ckpt"]).parent / "args.json").read_text())
        assert args["train"]["seed"] == int(r["seed"])
        assert args["train"]["early_stop_patience"] == 2
        assert args["train"]["on_policy_ratio"] == (0.5 if r["method"].endswith("+on_policy") else 0.0)
        if r["method"] != "sft":
            assert args["criterion_options"]["kd_rate"] == pytest.approx(float(r["kd_rate"]))
            teacher = args["model"]["teacher_model_path"]
            assert ("teacher_same_vocab" in teacher) == r["method"].endswith("@same") or \
                table[r["method"].split("@")[0].split("+")[0]].setting == "same"
    with open(out / "table.csv") as fh:
        rows = {(r["setting"], r["method"]) for r in csv.DictReader(fh)}
    assert ("cross", "mcw_kd") in rows and ("same", "mcw_kd@same") in rows and ("same", "sft") in rows
    assert ("mismatch", "mcw_kd") in rows and ("cross", "mcw_kd+on_policy") in rows
    for png in ("loss_curves.png", "differences.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timing = json.loads((out / "timing.json").read_text())
    assert timing["total_s"] >= 0 and "mcw_kd seed 1" in timing["stages_s"]


def test_a_finished_evaluation_is_read_back_without_starting_evaluate(tmp_path, monkeypatch):
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    (data / "valid.jsonl").write_text('{"prompt": "p", "output": "o"}\n')
    out = tmp_path / "eval"
    calls = []

    def fake_run(cmd, **kw):   # what evaluate.py leaves behind
        calls.append(cmd)
        out.mkdir(exist_ok=True)
        (out / "results.json").write_text(json.dumps({"datasets": {"tiny": {"n": len(calls)}}}))

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    args = ("ckpt", tmp_path / "data", [10, 20], -1, out)
    assert compare.evaluate(*args) == {"n": 1}
    assert compare.evaluate(*args) == {"n": 1} and len(calls) == 1             # read back
    compare.evaluate(*args, greedy=True)                                        # another request
    (data / "valid.jsonl").write_text('{"prompt": "p", "output": "other"}\n')   # other data
    compare.evaluate(*args)
    assert len(calls) == 3
