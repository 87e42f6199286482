"""Per-example cost of the token DTW features: ours (rapidfuzz cdist + numpy row scan) vs the
published pure-Python double loop (one Levenshtein call per cell, greedy backtracking).

Run (CPU; takes ~1 minute)::

    python benchmarks/bench_alignment.py                # GPT-2 student vs Qwen1.5 teacher tokens
    python benchmarks/bench_alignment.py --lengths 128 256 512 --repeats 5

Token strings come from real Dolly text tokenised by the two tokenizers of ../shared/model_hub
(cut or repeated to each length). Each "example" is the MCW-KD feature (two DTW passes over the
token strings, student -> teacher and back) plus the MinED feature (one DTW pass over the strings
with the word markers "Ġ" / "▁" stripped), i.e. what the data pipeline
computes once per example. The published code recomputed them at every training step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

import numpy as np  # noqa: E402
from rapidfuzz.distance import Levenshtein  # noqa: E402

from mckd.data import alignment as al  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import machine  # noqa: E402


def python_dtw(series_1, series_2, dist):
    """The published algorithm, cell by cell (used here only as the baseline to time)."""
    n, m = len(series_1), len(series_2)
    D = np.full((n + 1, m + 1), np.inf)
    D[0, 0] = 0
    for i, a in enumerate(series_1):
        for j, b in enumerate(series_2):
            D[i + 1, j + 1] = dist(a, b) + min(D[i, j + 1], D[i + 1, j], D[i, j])
    D = D[1:, 1:]
    i, j, path = n - 1, m - 1, []
    while i > 0 or j > 0:
        path.append((i, j))
        opts = [D[i - 1, j - 1] if i and j else np.inf, D[i - 1, j] if i else np.inf,
                D[i, j - 1] if j else np.inf]
        k = int(np.argmin(opts))
        i, j = (i - 1, j - 1) if k == 0 else (i - 1, j) if k == 1 else (i, j - 1)
    path.append((0, 0))
    return path[::-1]


def python_example(s, t, ms, mt):
    lev = Levenshtein.distance
    python_dtw(s, t, lev)
    python_dtw(t, s, lev)
    python_dtw([x.replace(mt, "") for x in t], [x.replace(ms, "") for x in s], lev)


def ours_example(s, t, ms, mt):
    al.dtw_pairs(s, t)
    al.mined_teacher_index([x.replace(ms, "") for x in s], [x.replace(mt, "") for x in t], 0, 0, len(s))


def tokens(tok, text, n):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (n // max(len(ids), 1) + 1))[:n]
    return tok.convert_ids_to_tokens(ids)


def timeit(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    from mckd.models.tokenizers import load_tokenizer

    shared = Path(os.environ.get("MCKD_SHARED", ROOT.parent / "shared"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", default=str(shared / "model_hub/gpt2/gpt2-base"))
    ap.add_argument("--teacher", default=str(shared / "model_hub/qwen/Qwen1.5-1.8B"))
    ap.add_argument("--data", default=str(shared / "data/dolly/dev.jsonl"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--repeats", type=int, default=5, help="best-of repeats for ours")
    ap.add_argument("--python-repeats", type=int, default=1, help="best-of repeats for the loop")
    args = ap.parse_args()

    s_tok, t_tok = load_tokenizer(args.student), load_tokenizer(args.teacher)
    ms, mt = al.word_marker(s_tok), al.word_marker(t_tok)
    text = " ".join(json.loads(line)["prompt"] + json.loads(line)["output"]
                    for line in list(open(args.data, encoding="utf-8"))[:20])
    print(f"# {machine()}")
    print(f"student {Path(args.student).name}, teacher {Path(args.teacher).name}; "
          f"per example = MCW-KD (2 DTW passes) + MinED (1 pass)")
    print("| length (N = M) | pure-Python loop (s) | ours (ms) | speed-up |")
    print("|---|---|---|---|")
    for n in args.lengths:
        s, t = tokens(s_tok, text, n), tokens(t_tok, text, n)
        assert al.dtw_path(al.levenshtein_matrix(s, t)) == python_dtw(s, t, Levenshtein.distance)
        ours = timeit(lambda: ours_example(s, t, ms, mt), args.repeats)
        loop = timeit(lambda: python_example(s, t, ms, mt), args.python_repeats)
        print(f"| {n} | {loop:.3f} | {ours * 1e3:.1f} | {loop / ours:.0f}x |", flush=True)
    print(f"# done: {machine()}")


if __name__ == "__main__":
    main()
