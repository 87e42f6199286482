"""The prepared GPU check (scripts/gpu_check.sh): its CPU small mode runs every part end to end
(criteria in bf16 against fp32, the benchmarks at tiny sizes, training with plain torch and
DeepSpeed ZeRO-2/3 + resume + run_eval.sh) so the script cannot rot between runs on a GPU; the
part runner isolates failures and enforces its time limits; the CUDA mode runs where a GPU is."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

PARTS = ["env", "setup", "criteria", *(f"train:{c}:{e}" for c, e in gpu_check.CHAINS["small"]),
         "bench_mcw", "bench_step", "bench_criteria", "bench_generation"]
# CI shares two cores with the rest of the suite (and measured load averages of 8-12 on the shared
# development machine tripled the wall time): the limits are tripled so that load does not kill
# parts; the check's own time is asserted against the tripled total.
TIME_SCALE = 3.0
ZERO3_DTYPES = ("ZeRO-3 with bf16: DeepSpeed leaves parameters made outside zero.Init uncast, so the "
                "criterion's fp32 projectors sit beside the bf16-partitioned student and ZeRO-3's "
                "defragment asserts one dtype (AssertionError in deepspeed/runtime/zero/utils.py)")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpu_check")
    out, work = base / "out", base / "work"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env=dict(_env(), DEVICE="cpu", OUT=str(out), WORK=str(work),
                                                          GPU_CHECK_TIME_SCALE=str(TIME_SCALE),
                                                          GPU_CHECK_WHEELS=str(base / "no_wheels")))
    results = json.loads((out / "results.json").read_text())
    return out, results, res


@pytest.mark.slow
def test_small_mode_writes_summary_json_and_logs(small_run):
    out, results, res = small_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["logs.txt", "results.json", "summary.md"]
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)   # at most two folders deep
    assert list(results["parts"]) == PARTS
    summary = (out / "summary.md").read_text()
    for name, part in results["parts"].items():
        assert part["status"] in ("pass", "fail", "skip"), name
        assert f"| {name} | **{part['status']}** |" in summary
        assert f"===== {name} ({part['status']}) =====" in (out / "logs.txt").read_text()
    assert results["mode"] == "small"
    assert results["total_seconds"] < gpu_check.TOTAL_BUDGET["small"] * TIME_SCALE + 30
    assert res.returncode == (1 if any(p["status"] == "fail" for p in results["parts"].values()) else 0)
    for title in ("## Criteria in bf16 against fp32", "## bench_mcw", "## bench_step", "## bench_criteria",
                  "## bench_generation"):
        assert title in summary


@pytest.mark.slow
@pytest.mark.parametrize("part", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=ZERO3_DTYPES)) if p.endswith(":zero3") else p
    for p in PARTS])
def test_small_mode_part_passes(small_run, part):
    _, results, _ = small_run
    got = results["parts"][part]
    assert got["status"] == "pass", got.get("reason")


@pytest.mark.slow
def test_small_mode_criteria_rows(small_run):
    """Every registered criterion ran in the three precisions on the same batch, within tolerance."""
    from mckd.criteria import known_criteria

    _, results, _ = small_run
    data = results["parts"]["criteria"]["data"]
    # criteria the test suite registers in this process (test_*) are not in the check's own process
    assert [r["criterion"] for r in data["rows"]] == [n for n in known_criteria() if not n.startswith("test_")]
    tol = data["tolerance"]
    for r in data["rows"]:
        assert r["T_s"] > 1 and r["label_tokens"] > 0, r
        for mode in ("autocast", "bf16"):
            m = r[mode]
            assert m["finite"] and math.isfinite(m["loss"]), (r["criterion"], mode)
            assert m["abs_dev"] <= tol["loss_rtol"] * abs(r["fp32"]["loss"]) + tol["loss_atol"], (r["criterion"], mode)
            assert m["grad_cos"] >= tol["grad_cos_min"], (r["criterion"], mode)


@pytest.mark.slow
def test_small_mode_training_resumed_and_evaluated(small_run):
    _, results, _ = small_run
    steps = gpu_check.TRAIN_SIZES["small"][0]
    for crit, engine in gpu_check.CHAINS["small"]:
        if engine == "zero3":
            continue  # the known ZeRO-3 bf16 failure (see test_small_mode_part_passes)
        r = results["parts"][f"train:{crit}:{engine}"]
        assert r["steps"] == steps and r["checkpoint"].endswith(f"_step{steps}"), r
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
        if engine in gpu_check.EVAL_ENGINES["small"]:
            assert math.isfinite(r["eval_rougeL"]), r


def _check(tmp_path, budget=60.0):
    args = argparse.Namespace(small=True, out=str(tmp_path / "out"), work=str(tmp_path / "work"), budget=budget,
                              parts=["env", "setup", "x", "y"], tokenizers="tiny", jobs=None, time_scale=1.0)
    c = gpu_check.Check(args)
    c.logs.mkdir(parents=True)
    return c


def test_part_timeout_kills_the_process_group_and_the_next_part_runs(tmp_path):
    c = _check(tmp_path)
    marker = tmp_path / "child_alive"
    # a child that outlives its parent's kill unless the whole group is killed
    cmd = ["bash", "-c", f"(sleep 3; touch {marker}) & sleep 30"]
    t0 = time.monotonic()
    rc, sec = c.run(cmd, c.logs / "x.log", timeout=1.5)
    assert rc is None and sec < 10 and time.monotonic() - t0 < 10
    time.sleep(3.5)
    assert not marker.exists()
    assert "killed after" in (c.logs / "x.log").read_text()
    assert c.run([sys.executable, "-c", "print('ok')"], c.logs / "y.log", timeout=30)[0] == 0


def test_a_failing_part_is_recorded_and_does_not_stop_the_check(tmp_path):
    c = _check(tmp_path)

    def boom(log):
        raise RuntimeError("broken part")

    assert c.part("x", boom)["status"] == "fail"
    assert "RuntimeError: broken part" in c.results["x"]["reason"]
    assert c.part("y", lambda log: {"status": "pass"})["status"] == "pass"
    assert c.part("not_selected", lambda log: {"status": "pass"}) == {}
    c.deadline = time.monotonic() - 1  # budget spent: later parts are skipped, with the reason
    assert c.part("y", lambda log: {"status": "pass"})["reason"] == "the check's total time budget was spent"


def test_real_tokenizer_folder_is_found_only_when_complete(tmp_path):
    import gpu_check_parts as parts

    hub = tmp_path / "hub"
    (hub / "gpt2" / "gpt2-base").mkdir(parents=True)
    (hub / "gpt2" / "gpt2-base" / "config.json").write_text("{}")
    assert parts.find_real_hub(str(hub)) != hub            # the Qwen folder is missing
    (hub / "qwen" / "Qwen1.5-1.8B").mkdir(parents=True)
    (hub / "qwen" / "Qwen1.5-1.8B" / "config.json").write_text("{}")
    assert parts.find_real_hub(str(hub)) == hub


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_mode_passes_every_part(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "out"
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, timeout=900,
                   env=dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work")))
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert {n: p["status"] for n, p in parts.items()} == {n: "pass" for n in parts}
