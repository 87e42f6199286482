"""Data preparation command, offline on a small raw Dolly-format file written here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from mckd.data.examples import read_examples, render_prompt
from mckd.data.prepare import main, prepare_dolly

CATEGORIES = ["open_qa", "closed_qa", "brainstorming", "summarization"]


def raw_file(path, n=40):
    recs = []
    for i in range(n):
        recs.append({"instruction": f"  Question {i}?  ", "context": f"Context {i}." if i % 3 == 0 else "",
                     "response": f"Answer {i}." if i % 10 != 7 else "   ",  # 4 empty responses
                     "category": CATEGORIES[i % 4]})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def test_prepare_dolly_splits_and_schema(tmp_path):
    raw = raw_file(tmp_path / "databricks-dolly-15k.jsonl")
    out = tmp_path / "dolly"
    info = prepare_dolly(str(raw), out, dev_size=6, valid_size=5, seed=3)
    assert info["skipped_empty"] == 4 and info["counts"] == {"valid": 5, "dev": 6, "train": 25}
    seen = []
    for split, n in info["counts"].items():
        lines = [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
        assert len(lines) == n
        for r in lines:
            assert r["prompt"] == render_prompt(r["instruction"], r["input"])
            assert r["instruction"] == r["instruction"].strip() and r["output"].strip()
            assert r["topic"] in CATEGORIES
        seen += [r["instruction"] for r in lines]
        assert len(read_examples(out / f"{split}.jsonl")) == n  # readable by the training code
    assert len(set(seen)) == 36  # disjoint splits covering every non-empty record
    # deterministic for a seed, different for another
    again = prepare_dolly(str(raw), tmp_path / "again", dev_size=6, valid_size=5, seed=3)
    assert again["counts"] == info["counts"]
    assert (tmp_path / "again" / "valid.jsonl").read_text() == (out / "valid.jsonl").read_text()
    prepare_dolly(str(raw), tmp_path / "other", dev_size=6, valid_size=5, seed=4)
    assert (tmp_path / "other" / "valid.jsonl").read_text() != (out / "valid.jsonl").read_text()
    with pytest.raises(FileExistsError):
        prepare_dolly(str(raw), out, dev_size=6, valid_size=5, seed=3)


def test_prompt_length_filter(tmp_path, stand_in_hub):
    raw = raw_file(tmp_path / "raw.jsonl", n=20)
    long = {"instruction": "word " * 400, "context": "", "response": "ok", "category": "open_qa"}
    with raw.open("a") as f:
        f.write(json.dumps(long) + "\n")
    info = prepare_dolly(str(raw), tmp_path / "o", dev_size=2, valid_size=2, seed=0,
                         tokenizer_path=str(stand_in_hub / "gpt2"), max_prompt_tokens=256)
    assert info["skipped_long_prompt"] == 1 and sum(info["counts"].values()) == 18


def test_cli_errors_and_entry_point(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"\n')
    assert main(["dolly", "--raw", str(bad), "--out", str(tmp_path / "o")]) == 2
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"instruction": "a", "context": ""}\n')
    with pytest.raises(Exception, match=f"{missing}:1: missing field"):
        prepare_dolly(str(missing), tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    raw = raw_file(tmp_path / "raw.jsonl")
    proc = subprocess.run([sys.executable, "-m", "mckd.data.prepare", "dolly", "--raw", str(raw),
                           "--out", str(tmp_path / "cli"), "--dev-size", "3", "--valid-size", "2",
                           "--seed", "1"], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "code"), "PATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"] == {"valid": 2, "dev": 3, "train": 31}
