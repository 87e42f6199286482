"""MCW-KD criterion time and peak memory outside the model passes, beside the published formulation
(per-example loop oracle + the per-step Python DTW) and DSKD-CMA, same inputs, one run.

Run (CPU by default, one torch thread; on a GPU add ``--device cuda --dtype bf16``)::

    python benchmarks/bench_mcw.py                                              # B=4, L=128 256
    python benchmarks/bench_mcw.py --lengths 128 256 512 1024 --published-max-length 512 --json mcw.json
    python benchmarks/bench_mcw.py --device cuda --dtype bf16 --lengths 128 256 512 1024 --repeats 10

Shapes: GPT2-base student (V_s = 50257, D_s = 768), Qwen1.5-1.8B-shaped teacher (V_t = 151936,
D_t = 2048), top-k 400; layout and method in :mod:`harness` (35 % prompt, 55 % labels, 10 %
padding; interleaved repeats, median; peak memory of one step in a fresh process on CPU).

Rows:

* ``cross_entropy``: plain CE. ``dual_space_kd_with_cma``: the DSKD-CMA criterion.
* ``mcw_kd:default`` / ``mcw_kd:reference``: the whole criterion (CE + DSKD-CMA + both OT terms).
* ``mcw_ot:default`` / ``mcw_ot:reference``: the two OT terms alone (``MCWKD.ot_terms``).
* ``published:ot``: the published OT formulation alone (``tests/mcw_reference_oracle.py``:
  full-vocabulary sort, per-example loops, (M, N, K) KL tensor, 100 unrolled ETP iterations, Python
  context loop) plus the two pure-Python DTWs per example it ran every step; timed once.
* ``published:dtw``: only the two per-step pure-Python DTWs of every example (the part that ran on
  the host whatever the device: 4.9 of the 5.7 s the published criterion took on an H100).
* ``published``: ``published:ot`` + CE + our batched DSKD-CMA term (the published CMA computed every
  position, so this row understates the published cost); timed once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_criteria import print_rows  # noqa: E402
from harness import GPT2_BASE, QWEN_1_8B  # noqa: E402

ROWS = ("cross_entropy", "dual_space_kd_with_cma", "mcw_ot:default", "mcw_ot:reference", "mcw_kd:default",
        "mcw_kd:reference", "published:dtw", "published:ot", "published")
SLOW = ("published:dtw", "published:ot", "published")


def python_dtw_cost(stu, tea):
    """The published per-step DTW edit cost of one example (two O(N M) Python DTWs, one per direction)."""
    import numpy as np
    from rapidfuzz.distance import Levenshtein

    def dtw(a, b):
        n, m = len(a), len(b)
        D = np.full((n + 1, m + 1), np.inf)
        D[0, 0] = 0
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                D[i + 1, j + 1] = Levenshtein.distance(x, y) + min(D[i, j + 1], D[i + 1, j], D[i, j])
        i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
        while i > 0 or j > 0:
            opts = [D[i, j] if i and j else np.inf, D[i, j + 1] if i else np.inf, D[i + 1, j] if j else np.inf]
            k = int(np.argmin(opts))
            i, j = (i - 1, j - 1) if k == 0 else (i - 1, j) if k == 1 else (i, j - 1)
            path.append((i, j))
        return path

    c = np.zeros((len(tea), len(stu)))
    for i, j in dtw(stu, tea):
        c[j, i] += Levenshtein.distance(stu[i], tea[j]) / 2
    for j, i in dtw(tea, stu):
        c[j, i] += Levenshtein.distance(stu[i], tea[j]) / 2
    return c


def _criterion(row: str, device: str, dtype: str, top_k: int):
    from mckd.criteria import get_criterion_class
    from mckd.criteria.mcw.presets import preset

    name = row.split(":")[0]
    if name == "cross_entropy":
        crit = get_criterion_class("cross_entropy")()
    elif name == "dual_space_kd_with_cma":
        crit = get_criterion_class(name)(GPT2_BASE["hidden"], QWEN_1_8B["hidden"])
    else:
        which = row.split(":")[1] if name in ("mcw_kd", "mcw_ot") else "reference"
        crit = get_criterion_class("mcw_kd")(GPT2_BASE["hidden"], QWEN_1_8B["hidden"],
                                             options=preset(which, top_k=top_k), kd_rate=0.5)
    return crit.to(device=device, dtype=harness.DTYPES[dtype])


def _published_dtw(inp):
    """(T_t, T_s) published DTW edit costs of every example, computed in Python as every step did."""
    import torch

    s_mask = inp.batch["attention_mask"].bool()
    n = [int(m.sum()) for m in s_mask]
    return [torch.tensor(python_dtw_cost(inp.words[b][:n[b]], inp.words[b][:n[b]]), dtype=torch.float32,
                         device=s_mask.device) for b in range(len(n))]


def _published_ot(crit, inp):
    """The published OT terms of one step (DTW in Python + loop oracle), differentiable."""
    import torch
    from mcw_reference_oracle import published_ot_hidden, published_ot_logits

    batch, student, teacher = inp.batch, inp.student, inp.teacher
    s_mask = batch["attention_mask"].bool()
    t_mask = batch["teacher_attention_mask"].bool()
    dense = _published_dtw(inp)
    with torch.autocast(device_type=s_mask.device.type, enabled=False):
        ot_l, _ = published_ot_logits(student.logits, teacher.logits, student.hidden, teacher.hidden, s_mask,
                                      t_mask, crit.ot_projector, crit.salience_head, (0.2, 0.5, 0.3),
                                      k=crit.options.top_k, t=0.5)
        ot_h, _ = published_ot_hidden(student.hidden, teacher.hidden, s_mask, t_mask, crit.ot_projector, dense,
                                      (0.3, 0.5, 0.2))
    return ot_l + ot_h


def step_fn(row: str, crit, inp):
    from mckd.criteria.common import cross_entropy_sum

    def run():
        harness.clear_grads(inp)
        if row.startswith("mcw_ot:"):
            ot = crit.ot_terms(inp.batch, inp.student, inp.teacher)
            loss = ot["ot_logits"].sum() + ot["ot_hidden"].sum()
        elif row == "published:dtw":
            _published_dtw(inp)
            return
        elif row == "published:ot":
            loss = _published_ot(crit, inp)
        elif row == "published":
            ce, _ = cross_entropy_sum(inp.student.logits, inp.batch["labels"])
            loss = ce + crit.cma_terms(inp.batch, inp.student, inp.teacher).kd * 0.5 + _published_ot(crit, inp)
        else:
            loss = crit(inp.batch, inp.student, inp.teacher).loss_sum
        loss.backward()
    run.clear = lambda: harness.clear_grads(inp)
    run.warmup = row not in SLOW
    return run


def build_step(row, B, T, device, dtype, threads, top_k, flush_denormal=False):
    harness.configure_cpu(threads, flush_denormal)
    inp = harness.make_inputs(B, T, device=device, dtype=dtype, with_words=row in SLOW)
    return step_fn(row, _criterion(row, device, dtype, top_k), inp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    harness.add_common_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--published-max-length", type=int, default=512,
                   help="skip the (slow, memory-hungry) published rows above this length")
    p.add_argument("--top-k", type=int, default=400)
    args = p.parse_args(argv)
    harness.configure_cpu(args.threads, not args.keep_denormals)
    print(f"# {harness.machine()}; B={args.batch}, {args.device}, {args.dtype}, top-k {args.top_k}, "
          f"flush denormals {not args.keep_denormals}", flush=True)
    results = []
    for T in args.lengths:
        rows = [r for r in args.rows if r not in SLOW or T <= args.published_max_length]
        inp = harness.make_inputs(args.batch, T, device=args.device, dtype=args.dtype,
                                  with_words=any(r in SLOW for r in rows))
        fns = {r: step_fn(r, _criterion(r, args.device, args.dtype, args.top_k), inp) for r in rows}
        times = harness.time_interleaved(fns, args.device, args.repeats, once=SLOW)
        res = []
        for r in rows:
            out = {"row": r, "B": args.batch, "T": T, "device": args.device, "dtype": args.dtype,
                   **harness.summary(times[r])}
            if args.device == "cuda" and r not in SLOW:
                out["peak_mib"] = harness.cuda_peak_mib(fns[r])
            elif args.device == "cpu" and args.memory:
                out["peak_mib"] = harness.peak_memory_fresh_process(build_step, r, args.batch, T, args.device,
                                                                    args.dtype, args.threads, args.top_k,
                                                                    not args.keep_denormals)
            res.append(out)
        del fns, inp
        print_rows(res)
        med = {r["row"]: r["median_ms"] for r in res}
        if "published" in med and "mcw_kd:reference" in med:
            print(f"# L={T}: published / mcw_kd:reference = {med['published'] / med['mcw_kd:reference']:.1f}x"
                  + (f"; published:ot / mcw_ot:reference = {med['published:ot'] / med['mcw_ot:reference']:.1f}x"
                     if "published:ot" in med and "mcw_ot:reference" in med else ""), flush=True)
        if "dual_space_kd_with_cma" in med:
            for r in ("mcw_kd:default", "mcw_kd:reference"):
                if r in med:
                    print(f"# L={T}: {r} / dual_space_kd_with_cma = {med[r] / med['dual_space_kd_with_cma']:.2f}x")
        results.extend(res)
    return harness.finish(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
