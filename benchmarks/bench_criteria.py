"""Forward + backward time and peak memory of each criterion, outside the model passes.

Run (CPU by default; a GPU with ``--device cuda --dtype bf16``)::

    python benchmarks/bench_criteria.py                                   # B=4, T=128, all criteria
    python benchmarks/bench_criteria.py --lengths 128 256 512 --repeats 3
    python benchmarks/bench_criteria.py --device cuda --dtype bf16 --lengths 128 256 512
    python benchmarks/bench_criteria.py --criteria dual_space_kd_with_cma --json out.json

Inputs are random tensors of realistic shapes: student GPT2-base (V_s = 50257, D_s = 768);
same-vocabulary teacher GPT2-1.5B-shaped (V = 50257, D = 1600) for ``various_divergence`` and
``dual_space_kd``; cross-vocabulary teacher Qwen1.5-1.8B-shaped (V_t = 151936, D_t = 2048) for
``dual_space_kd_with_cma``, ``universal_logit_distillation`` and ``multi_level_ot``. Each example
has a 25 % prompt, a 70 % response and 5 % right padding (~70 % label positions). Student logits
and hidden states require grad (as after a student forward); the teacher's do not. The embedding
tables double as the (tied) output heads.

Reported per (criterion, T): median milliseconds of one forward + backward of the criterion, and
peak memory above the inputs: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak resident
set size of a fresh process (each configuration runs in its own process) minus the RSS once the
inputs exist. ``cross_entropy`` is the plain CE step every KD step also pays.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

STUDENT = dict(vocab=50257, hidden=768)
SAME_TEACHER = dict(vocab=50257, hidden=1600)
CROSS_TEACHER = dict(vocab=151936, hidden=2048)
CRITERIA = {  # name -> (teacher shape or None, constructor kwargs)
    "cross_entropy": (None, {}),
    "various_divergence": (SAME_TEACHER, {"kd_objective": "forward_kl"}),
    "various_divergence:adaptive_kl": (SAME_TEACHER, {"kd_objective": "adaptive_kl"}),
    "dual_space_kd": (SAME_TEACHER, {}),
    "dual_space_kd_with_cma": (CROSS_TEACHER, {}),
    "universal_logit_distillation": (CROSS_TEACHER, {}),
    "multi_level_ot": (CROSS_TEACHER, {}),
}


def _labels(torch, B, T, V, device, g):
    lab = torch.randint(0, V, (B, T), generator=g).to(device)
    lab[:, : int(0.25 * T)] = -100
    lab[:, T - max(1, int(0.05 * T)):] = -100
    return lab


def _setup(name: str, B: int, T: int, device: str, dtype_name: str):
    import torch
    from torch import nn

    from mckd.criteria import ModelView, get_criterion_class

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    teacher_shape, kwargs = CRITERIA[name]
    cls = get_criterion_class(name.split(":")[0])
    g = torch.Generator().manual_seed(0)
    if cls.__name__ in ("DualSpaceKD", "DualSpaceKDWithCMA"):
        crit = cls(STUDENT["hidden"], teacher_shape["hidden"], **kwargs)
    else:
        crit = cls(**kwargs)
    crit = crit.to(device=device, dtype=dtype)
    emb_s = nn.Embedding(STUDENT["vocab"], STUDENT["hidden"]).to(device, dtype).requires_grad_(False)
    h_s = torch.randn(B, T, STUDENT["hidden"], generator=g).to(device, dtype).requires_grad_(True)
    z_s = (torch.randn(B, T, STUDENT["vocab"], generator=g) * 3).to(device, dtype).requires_grad_(True)
    batch = {"input_ids": torch.randint(0, STUDENT["vocab"], (B, T), generator=g).to(device),
             "labels": _labels(torch, B, T, STUDENT["vocab"], device, g)}
    student = ModelView(z_s, h_s, emb_s, emb_s)  # nn.Embedding has .weight (V, D): a tied head
    teacher = None
    if teacher_shape is not None:
        Vt, Dt = teacher_shape["vocab"], teacher_shape["hidden"]
        emb_t = nn.Embedding(Vt, Dt).to(device, dtype).requires_grad_(False)
        teacher = ModelView((torch.randn(B, T, Vt, generator=g) * 3).to(device, dtype),
                            torch.randn(B, T, Dt, generator=g).to(device, dtype), emb_t, emb_t)
        if teacher_shape is CROSS_TEACHER:
            batch["teacher_input_ids"] = torch.randint(0, Vt, (B, T), generator=g).to(device)
            batch["teacher_labels"] = _labels(torch, B, T, Vt, device, g)
    return crit, batch, student, teacher


def _measure(name: str, B: int, T: int, device: str, dtype: str, repeats: int) -> dict:
    import psutil
    import torch

    crit, batch, student, teacher = _setup(name, B, T, device, dtype)

    def step():
        student.logits.grad = None
        student.hidden.grad = None
        out = crit(batch, student, teacher)
        out.loss_sum.backward()
        return out

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process().memory_info().rss
    times = []
    for i in range(repeats + 1):  # the first run is a warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"criterion": name, "B": B, "T": T, "device": device, "dtype": dtype,
            "ms": 1000 * statistics.median(times), "peak_mib": max(peak, 0) / 2 ** 20}


def _worker(args, queue):
    try:
        queue.put(_measure(*args))
    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
        queue.put({"criterion": args[0], "T": args[2], "error": f"{type(e).__name__}: {e}"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="+", default=[128])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = []
    print(f"{'criterion':34s} {'T':>5s} {'ms':>10s} {'peak MiB':>10s}  ({args.device}, {args.dtype}, B={args.batch})")
    ctx = mp.get_context("spawn")
    for T in args.lengths:
        for name in args.criteria:
            job = (name, args.batch, T, args.device, args.dtype, args.repeats)
            if args.device == "cpu":  # fresh process: a clean peak-RSS measurement
                q = ctx.Queue()
                proc = ctx.Process(target=_worker, args=(job, q))
                proc.start()
                row = q.get()
                proc.join()
            else:
                row = _measure(*job)
            rows.append(row)
            if "error" in row:
                print(f"{name:34s} {T:5d}  failed: {row['error']}")
            else:
                print(f"{name:34s} {T:5d} {row['ms']:10.1f} {row['peak_mib']:10.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
