"""MCW-KD criterion cost outside the model passes: ours (default and reference presets) beside the
published formulation (per-example loop oracle + the per-step Python DTW) and DSKD-CMA, same inputs.

Run (CPU by default; on a GPU add ``--device cuda --dtype bf16``)::

    python benchmarks/bench_mcw.py                                   # B=4, L=128 256
    python benchmarks/bench_mcw.py --lengths 128 256 512 1024 --published-max-length 512
    python benchmarks/bench_mcw.py --device cuda --dtype bf16 --lengths 128 256 512 1024 --json mcw.json

Shapes: GPT2-base student (V_s = 50257, D_s = 768) and a Qwen1.5-1.8B-shaped teacher (V_t = 151936,
D_t = 2048), top-k 400; each example has a 25 % prompt, 70 % response and 5 % right padding, every
length L for both tokenizations. Student logits and hidden states require grad; the teacher's do not.

Rows (median and minimum ms of forward + backward over the repeats; the minimum is the robust figure
on a shared CPU; and peak memory above the inputs: CUDA max allocated on GPU,
peak RSS of a fresh process on CPU):

* ``mcw_kd:default`` / ``mcw_kd:reference``: the whole criterion (CE + DSKD-CMA + both OT terms).
* ``mcw_ot:default``: the two OT terms alone (``MCWKD.ot_terms``).
* ``published``: the published OT formulation (``tests/mcw_reference_oracle.py``: full-vocabulary
  sort, per-example loops, (M, N, K) KL tensor, 100 unrolled ETP iterations, Python context loop)
  plus the two pure-Python DTWs per example it ran every step; + the CMA term.
* ``dual_space_kd_with_cma``: the DSKD-CMA criterion; ``cross_entropy``: plain CE.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))
sys.path.insert(0, str(ROOT / "tests"))

ROWS = ("cross_entropy", "dual_space_kd_with_cma", "mcw_ot:default", "mcw_kd:default", "mcw_kd:reference",
        "published")


def python_dtw_cost(stu, tea):
    """The published per-step DTW edit cost of one example (two O(N M) Python DTWs, spec 7.4)."""
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


def _setup(row, B, T, device, dtype_name, args):
    import torch
    from torch import nn

    from mckd.criteria import ModelView, get_criterion_class
    from mckd.criteria.mcw_presets import preset

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    Vs, Ds, Vt, Dt = args.student_vocab, args.student_hidden, args.teacher_vocab, args.teacher_hidden

    def labels(V):
        lab = torch.randint(0, V, (B, T), generator=g)
        lab[:, : int(0.25 * T)] = -100
        lab[:, T - max(1, int(0.05 * T)):] = -100
        return lab.to(device)

    att = torch.ones(B, T, dtype=torch.long)
    att[:, T - max(1, int(0.05 * T)):] = 0
    starts = torch.arange(T)[None].expand(B, -1) * 3
    off = torch.stack([starts, starts + 3], -1) * att[..., None]
    rng = random.Random(0)
    words = [["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(T)] for _ in range(B)]
    batch = {"input_ids": torch.randint(0, Vs, (B, T), generator=g).to(device), "labels": labels(Vs),
             "attention_mask": att.to(device), "offsets": off.to(device),
             "teacher_input_ids": torch.randint(0, Vt, (B, T), generator=g).to(device), "teacher_labels": labels(Vt),
             "teacher_attention_mask": att.to(device), "teacher_offsets": off.to(device)}
    # DTW pairs as the data pipeline delivers them (a diagonal path here; the values do not matter for speed).
    idx = torch.arange(T)
    batch["dtw_index"] = torch.stack([idx, idx], -1)[None].expand(B, -1, -1).contiguous().to(device)
    batch["dtw_value"] = torch.rand(B, T, generator=g).to(device)
    batch["dtw_mask"] = att.bool().to(device)
    emb_s = nn.Embedding(Vs, Ds).to(device, dtype).requires_grad_(False)
    emb_t = nn.Embedding(Vt, Dt).to(device, dtype).requires_grad_(False)
    student = ModelView((torch.randn(B, T, Vs, generator=g) * 3).to(device, dtype).requires_grad_(True),
                        torch.randn(B, T, Ds, generator=g).to(device, dtype).requires_grad_(True), emb_s, emb_s)
    teacher = ModelView((torch.randn(B, T, Vt, generator=g) * 3).to(device, dtype),
                        torch.randn(B, T, Dt, generator=g).to(device, dtype), emb_t, emb_t)
    name = row.split(":")[0]
    if name == "cross_entropy":
        crit = get_criterion_class("cross_entropy")()
    elif name == "dual_space_kd_with_cma":
        crit = get_criterion_class(name)(Ds, Dt)
    else:
        crit = get_criterion_class("mcw_kd")(Ds, Dt, options=preset(row.split(":")[1] if ":" in row else "reference",
                                                                     top_k=args.top_k), kd_rate=0.5)
    crit = crit.to(device=device, dtype=dtype)
    return crit, batch, student, teacher, words


def _step_fn(row, crit, batch, student, teacher, words):
    import torch

    if row == "mcw_ot:default":
        def step():
            ot = crit.ot_terms(batch, student, teacher)
            (ot["ot_logits"].sum() + ot["ot_hidden"].sum()).backward()
        return step
    if row != "published":
        return lambda: crit(batch, student, teacher).loss_sum.backward()
    from mcw_reference_oracle import published_ot_hidden, published_ot_logits

    def step():
        s_mask = batch["attention_mask"].bool()
        t_mask = batch["teacher_attention_mask"].bool()
        n = [int(m.sum()) for m in s_mask]
        dense = [torch.tensor(python_dtw_cost(words[b][:n[b]], words[b][:n[b]]), dtype=torch.float32,
                              device=s_mask.device) for b in range(len(n))]
        with torch.autocast(device_type=s_mask.device.type, enabled=False):
            ot_l, _ = published_ot_logits(student.logits, teacher.logits, student.hidden, teacher.hidden, s_mask,
                                          t_mask, crit.ot_projector, crit.salience_head, (0.2, 0.5, 0.3),
                                          k=crit.options.top_k, t=0.5)
            ot_h, _ = published_ot_hidden(student.hidden, teacher.hidden, s_mask, t_mask, crit.ot_projector, dense,
                                          (0.3, 0.5, 0.2))
        kd = crit.cma_terms(batch, student, teacher).kd
        (kd + ot_l + ot_h).backward()
    return step


def _measure(row, B, T, device, dtype, repeats, args):
    import psutil
    import torch

    crit, batch, student, teacher, words = _setup(row, B, T, device, dtype, args)
    step = _step_fn(row, crit, batch, student, teacher, words)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process().memory_info().rss
    times = []
    for i in range(repeats + (1 if row != "published" else 0)):  # warm-up, except for the slow loop
        student.logits.grad = student.hidden.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i or row == "published":
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"row": row, "B": B, "T": T, "device": device, "dtype": dtype, "ms": 1000 * statistics.median(times),
            "min_ms": 1000 * min(times), "peak_mib": max(peak, 0) / 2 ** 20}


def _worker(job, queue):
    try:
        queue.put(_measure(*job))
    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
        queue.put({"row": job[0], "T": job[2], "error": f"{type(e).__name__}: {e}"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--published-max-length", type=int, default=512,
                   help="skip the (slow, memory-hungry) published loop above this length")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-k", type=int, default=400)
    p.add_argument("--student-vocab", type=int, default=50257)
    p.add_argument("--student-hidden", type=int, default=768)
    p.add_argument("--teacher-vocab", type=int, default=151936)
    p.add_argument("--teacher-hidden", type=int, default=2048)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    print(f"{'row':26s} {'L':>5s} {'median ms':>10s} {'min ms':>10s} {'peak MiB':>10s}  "
          f"({args.device}, {args.dtype}, B={args.batch})")
    ctx = mp.get_context("spawn")
    out = []
    for T in args.lengths:
        for row in args.rows:
            if row == "published" and T > args.published_max_length:
                continue
            job = (row, args.batch, T, args.device, args.dtype, args.repeats if row != "published" else 1, args)
            if args.device == "cpu":
                q = ctx.Queue()
                proc = ctx.Process(target=_worker, args=(job, q))
                proc.start()
                res = q.get()
                proc.join()
            else:
                res = _measure(*job)
            out.append(res)
            if "error" in res:
                print(f"{row:26s} {T:5d}  failed: {res['error']}", flush=True)
            else:
                print(f"{row:26s} {T:5d} {res['ms']:10.1f} {res['min_ms']:10.1f} {res['peak_mib']:10.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
