"""Profile one criterion's forward + backward (outside the model passes) and optionally compare code trees.

Run (CPU, one thread)::

    python benchmarks/profile_criterion.py dual_space_kd_with_cma --length 256          # op table
    python benchmarks/profile_criterion.py mcw_ot:default --length 512 --top 15
    # before/after a change: export the older tree and time both, interleaved, same inputs
    git archive <commit> code | tar -x -C /tmp/before
    python benchmarks/profile_criterion.py dual_space_kd_with_cma --length 256 --compare /tmp/before/code

Rows: those of ``bench_criteria.py`` plus ``mcw_ot:default`` / ``mcw_ot:reference`` (the OT terms of
MCW-KD alone). Inputs: :mod:`harness` (B = 4 by default, 35 % prompt, 55 % labels, 10 % padding,
fp32). With ``--compare DIR`` the package is imported from ``DIR`` in a second process and both
trees are timed round robin (median of ``--repeats``); nothing is profiled then.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

QWEN_ROWS = ("mcw_ot:default", "mcw_ot:reference")


def build(row: str, B: int, T: int, threads: int, code_dir: str | None):
    """Inputs and the step of ``row``; ``code_dir`` replaces the package location when given."""
    import torch

    if code_dir:
        sys.path.insert(0, code_dir)
    harness.configure_cpu(threads)
    import bench_criteria as bc

    if row in QWEN_ROWS:
        from mckd.criteria import get_criterion_class
        from mckd.criteria.mcw.presets import preset

        inp = harness.make_inputs(B, T)
        crit = get_criterion_class("mcw_kd")(768, 2048, options=preset(row.split(":")[1]), kd_rate=0.5)

        def step():
            harness.clear_grads(inp)
            ot = crit.ot_terms(inp.batch, inp.student, inp.teacher)
            (ot["ot_logits"].sum() + ot["ot_hidden"].sum()).backward()
        return step
    inp = harness.make_inputs(B, T, teacher=bc.ROWS[row][0])
    return bc.step_fn(bc.build_criterion(row, "cpu", "fp32"), inp)


def _server(row, B, T, threads, code_dir, conn):
    """Child process: build once, then run one timed step per request."""
    step = build(row, B, T, threads, code_dir)
    step()
    while conn.recv():
        t0 = time.perf_counter()
        step()
        conn.send(time.perf_counter() - t0)


def compare(args) -> None:
    ctx = mp.get_context("spawn")
    procs = {}
    for name, code in (("this tree", None), (args.compare, args.compare)):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_server, args=(args.row, args.batch, args.length, args.threads, code, child))
        p.start()
        procs[name] = (p, parent)
    times = {n: [] for n in procs}
    for _ in range(args.repeats):
        for n, (_, conn) in procs.items():
            conn.send(True)
            times[n].append(conn.recv())
    for n, (p, conn) in procs.items():
        conn.send(False)
        p.join()
    print(f"# {harness.machine()}; {args.row}, B={args.batch}, L={args.length}")
    for n, t in times.items():
        print(f"{n:40s} median {1000 * statistics.median(t):9.0f} ms  min {1000 * min(t):9.0f} ms  ({len(t)} runs)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("row")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=20, help="rows of the profiler table")
    p.add_argument("--compare", help="another tree's code/ directory to time against this one")
    args = p.parse_args(argv)
    if args.compare:
        compare(args)
        return 0
    from torch.profiler import ProfilerActivity, profile

    step = build(args.row, args.batch, args.length, args.threads, None)
    step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"# {harness.machine()}; {args.row}, B={args.batch}, L={args.length}: "
          f"median {1000 * statistics.median(times):.0f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
