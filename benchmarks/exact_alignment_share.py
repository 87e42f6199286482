"""Share of student label positions that the exact token alignment covers, on real data.

For each tokenizer pair, the data pipeline's ``"exact"`` feature is computed for every example of a
jsonl file (``build_dataset`` with ``alignment=("exact",)``, cached like any other run), and the
script prints, over all student label (response) positions:

* ``exact``: the share with an exactly aligned teacher position (same characters, same boundary
  before them): what ``dual_space_kd_v2``, ``uld_hybrid`` on one-token groups and MCW-KD's
  ``--mcw-exact-kl-weight`` read;
* ``boundary``: the share that ends at a character boundary both tokenizations share (the last
  token of every aligned group ``uld_hybrid`` compares);
* the mean and median of the per-example exact share.

Run (CPU, a minute per pair on Dolly)::

    python benchmarks/exact_alignment_share.py                          # both published pairs, Dolly
    python benchmarks/exact_alignment_share.py --pairs tiny --data data/tiny   # the embedded default
    python benchmarks/exact_alignment_share.py --json benchmarks/results/exact_alignment_share.json

Pairs: ``gpt2-qwen`` (GPT-2 student, Qwen1.5 teacher) and ``tinyllama-mistral`` read the tokenizers
of ``../shared/model_hub``; ``tiny`` reads ``model_hub/tiny/{student,teacher}`` (built by
``python -m mckd.tiny.build``).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

import numpy as np  # noqa: E402

from mckd.data import build_dataset  # noqa: E402
from mckd.models.tokenizers import load_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
PAIRS = {  # name -> (student dir, teacher dir)
    "gpt2-qwen": (SHARED / "model_hub/gpt2/gpt2-base", SHARED / "model_hub/qwen/Qwen1.5-1.8B"),
    "tinyllama-mistral": (SHARED / "model_hub/tinyllama/tinyllama-1.1b-3T",
                          SHARED / "model_hub/mistral/mistral-7b-v0.1"),
    "tiny": (ROOT / "model_hub/tiny/student", ROOT / "model_hub/tiny/teacher"),
}


def measure(student_dir: Path, teacher_dir: Path, data: Path, max_length: int, limit: int) -> dict:
    """Exact and boundary shares over the student label positions of one jsonl file."""
    stu = load_tokenizer(str(student_dir), what="student")
    tea = load_tokenizer(str(teacher_dir), what="teacher")
    ds = build_dataset(data, student_tokenizer=stu, teacher_tokenizer=tea, max_length=max_length,
                       alignment=("exact",), limit=limit)
    n_exact = n_boundary = n_labels = 0
    per_example = []
    for labels, exact, boundary in zip(ds.hf["labels"], ds.hf["exact_teacher_index"],
                                       ds.hf["boundary_teacher_index"]):
        lab = np.asarray(labels) != -100
        e = int((lab & (np.asarray(exact) >= 0)).sum())
        n_exact += e
        n_boundary += int((lab & (np.asarray(boundary) >= 0)).sum())
        n_labels += int(lab.sum())
        per_example.append(e / max(int(lab.sum()), 1))
    return {"examples": len(ds), "label_positions": n_labels, "exact_share": n_exact / max(n_labels, 1),
            "boundary_share": n_boundary / max(n_labels, 1),
            "exact_share_mean_per_example": statistics.fmean(per_example) if per_example else 0.0,
            "exact_share_median_per_example": statistics.median(per_example) if per_example else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", default=["gpt2-qwen", "tinyllama-mistral"], choices=tuple(PAIRS))
    p.add_argument("--data", default=str(SHARED / "data/dolly"),
                   help="folder with the jsonl split to read (default ../shared/data/dolly)")
    p.add_argument("--split", default=None, help="jsonl file name in --data (default: train.jsonl if "
                                                 "present, else dev.jsonl)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit", type=int, default=-1, help="first N examples (-1: all)")
    p.add_argument("--json", default=None, help="also write the figures to this json file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data_dir = Path(args.data)
    split = args.split or ("train.jsonl" if (data_dir / "train.jsonl").is_file() else "dev.jsonl")
    rows = {}
    for name in args.pairs:
        student_dir, teacher_dir = PAIRS[name]
        r = measure(student_dir, teacher_dir, data_dir / split, args.max_length, args.limit)
        rows[name] = dict(r, data=str(data_dir / split))
        print(f"{name:18s} {split}: {r['examples']} examples, {r['label_positions']} label positions: "
              f"exact {100 * r['exact_share']:.1f}%  boundary {100 * r['boundary_share']:.1f}%  "
              f"per-example exact mean {100 * r['exact_share_mean_per_example']:.1f}% "
              f"median {100 * r['exact_share_median_per_example']:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
