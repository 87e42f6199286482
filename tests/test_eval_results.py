"""Aggregation over seeds and datasets, the compare table, and the skip/conflict rules (no models)."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest

from mckd.evaluation.results import aggregate, collect_pairs, compare, default_names, load_results, write_results
from mckd.evaluation.runner import pair_dir, pair_status

SCORES = {  # dataset -> seed -> rougeL
    "dolly": {10: 20.0, 20: 22.0, 30: 27.0},
    "vicuna": {10: 11.5, 20: 13.5, 30: 12.0},
    "sinst/11_": {10: 30.0, 20: 31.0, 30: 29.0},
}


def _write_pairs(root, scores, settings=None):
    for ds, seeds in scores.items():
        for seed, rl in seeds.items():
            d = pair_dir(root, ds, seed)
            d.mkdir(parents=True)
            m = {"dataset": ds, "seed": seed, "rougeL": rl, "exact_match": rl / 10, "avg_gen_len": 40 + seed,
                 "n": 7, "settings": settings or {"do_sample": True}}
            (d / "metrics.json").write_text(json.dumps(m))


def test_aggregate_means_stds_and_average(tmp_path):
    _write_pairs(tmp_path, SCORES)
    res = write_results(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert list(res["datasets"]) == ["dolly", "vicuna", "sinst/11_"]  # paper column order
    for ds, seeds in SCORES.items():
        e = res["datasets"][ds]
        assert e["n_seeds"] == 3 and e["n_examples"] == 7
        assert e["rougeL_mean"] == pytest.approx(statistics.mean(seeds.values()), abs=1e-4)
        assert e["rougeL_std"] == pytest.approx(statistics.stdev(seeds.values()), abs=1e-4)
        assert e["avg_gen_len_mean"] == pytest.approx(60.0)
        assert e["seeds"]["20"]["rougeL"] == seeds[20]
    means = [statistics.mean(s.values()) for s in SCORES.values()]
    assert res["average"]["rougeL"] == pytest.approx(statistics.mean(means), abs=1e-4)
    assert res["average"]["n_datasets"] == 3
    md = (tmp_path / "results.md").read_text()
    assert "| dolly | 3 | 7 | 23.00 ± 3.61 |" in md and "**average**" in md


def test_single_seed_std_is_zero_and_empty_dir():
    res = aggregate({"dolly": {10: {"rougeL": 5.0, "exact_match": 0.0, "avg_gen_len": 3.0, "n": 2}}})
    assert res["datasets"]["dolly"]["rougeL_std"] == 0.0
    assert math.isnan(aggregate({})["average"]["rougeL"])


def test_compare_table_markdown_and_csv(tmp_path):
    a, b = tmp_path / "sft" / "epoch1_step10", tmp_path / "kd" / "epoch1_step10"
    _write_pairs(a / "eval", SCORES)
    _write_pairs(b / "eval", {"dolly": {10: 30.0, 20: 32.0}, "vicuna": {10: 15.0, 20: 17.0}})
    write_results(a / "eval")  # b has only per-pair files: aggregated on the fly
    assert default_names([a, b]) == ["sft/epoch1_step10", "kd/epoch1_step10"]
    md, text = compare([a, b / "eval"], names=["SFT", "KD"])
    lines = md.strip().splitlines()
    assert lines[0] == "| run | dolly | vicuna | sinst/11_ | avg |"
    avg_a = statistics.mean(statistics.mean(s.values()) for s in SCORES.values())
    assert lines[2].startswith("| SFT | 23.00 ± 3.61 | 12.33 ± 1.04 | 30.00 ± 1.00 |")
    assert lines[2].endswith(f"| {avg_a:.2f} |")
    assert lines[3] == "| KD | 31.00 ± 1.41 | 16.00 ± 1.41 | - | - |"  # missing column: no average
    rows = list(csv.DictReader(io.StringIO(text)))
    assert float(rows[0]["dolly_mean"]) == pytest.approx(23.0) and rows[1]["sinst/11__mean"] == ""
    assert float(rows[0]["avg"]) == pytest.approx(avg_a, abs=1e-4)
    md2, _ = compare([a, b], names=["SFT", "KD"], datasets=["dolly", "vicuna"])
    assert md2.strip().splitlines()[3].endswith(f"| {statistics.mean([31.0, 16.0]):.2f} |")
    with pytest.raises(ValueError):
        compare([a, b], names=["only-one"])
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "nothing")


def test_pair_status_skip_and_conflict(tmp_path):
    settings = {"do_sample": True, "max_new_tokens": 256}
    _write_pairs(tmp_path, {"dolly": {10: 1.0}}, settings=settings)
    d = pair_dir(tmp_path, "dolly", 10)
    assert pair_status(d, settings) == "done"
    assert pair_status(d, {**settings, "max_new_tokens": 128}) == "conflict"
    assert pair_status(pair_dir(tmp_path, "dolly", 20), settings) == "todo"
    assert collect_pairs(tmp_path)["dolly"][10]["rougeL"] == 1.0


def test_pair_status_same_data_under_another_path_is_done(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    a.write_text('{"x": 1}\n')
    b.write_text('{"x": 1}\n')
    c.write_text('{"x": 2}\n')
    settings = {"do_sample": True, "data_file": str(a)}
    _write_pairs(tmp_path / "out", {"dolly": {10: 1.0}}, settings=settings)
    d = pair_dir(tmp_path / "out", "dolly", 10)
    assert pair_status(d, {**settings, "data_file": str(b)}) == "done"        # same bytes
    assert pair_status(d, {**settings, "data_file": str(c)}) == "conflict"    # other data
    assert pair_status(d, {"do_sample": False, "data_file": str(b)}) == "conflict"
    assert pair_status(d, {**settings, "data_file": str(tmp_path / "gone.jsonl")}) == "conflict"
    # a record with the data's sha256: the same bytes match even after its file is gone
    sha = {"a": "1" * 64, "c": "2" * 64}
    hashed = {**settings, "data_sha256": sha["a"]}
    _write_pairs(tmp_path / "out2", {"dolly": {10: 1.0}}, settings=hashed)
    d2 = pair_dir(tmp_path / "out2", "dolly", 10)
    a.unlink()
    assert pair_status(d2, {**hashed, "data_file": str(tmp_path / "moved.jsonl")}) == "done"
    assert pair_status(d2, {**hashed, "data_sha256": sha["c"]}) == "conflict"
    # a record without one (older runs) against a hashed request: the files' bytes decide
    assert pair_status(d, {**settings, "data_file": str(b), "data_sha256": sha["a"]}) == "conflict"  # a is gone
