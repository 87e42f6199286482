"""Our batched log-domain Sinkhorn (``mckd.ot.sinkhorn``) beside POT's batched solver
(``ot.batch.solve_batch``, POT >= 0.9.6, optional), on MCW-KD-shaped problems.

Problems: B examples, M = N = 0.9 L supported points with the 35/55/10 layout of the criterion
benchmarks (the ``attention`` positions: prompt + response), random costs of order 1, the relative
eps of the default preset (0.1 x mean cost), fixed iteration counts. Each row times value +
backward of ``value.sum()`` (envelope gradient for both: the plan is a constant), interleaved.

Feature check printed before the table, on one padded batch:

- same plan on the supported block as ours, when POT gets the padded marginals (zero weight on
  padding) and when it gets the unpadded sub-problems one by one;
- whether POT accepts a fixed iteration count with no convergence test (``tol=0``) and a
  per-example eps.

    python benchmarks/bench_sinkhorn.py --lengths 128 256 512 --iters 50 100 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from harness import add_common_args, configure_cpu, layout, machine, summary, sync, time_interleaved  # noqa: E402
from mckd.ot.sinkhorn import masked_marginal, relative_epsilon, sinkhorn  # noqa: E402


def _pot():
    try:
        from ot.batch import solve_batch
    except ImportError:
        return None
    return solve_batch


def problem(B: int, L: int, device: str, seed: int = 0):
    """(cost (B, M, N) requiring grad, row mask, col mask, eps (B,)) on the attention positions."""
    g = torch.Generator().manual_seed(seed)
    _, attn = layout(B, L, "cpu")
    # vary the supported length per example so padding is exercised
    rows = attn.clone()
    for b in range(B):
        rows[b, int(attn[b].sum()) - 7 * b:] = False
    cost = torch.rand(B, L, L, generator=g).to(device).requires_grad_(True)
    rows, cols = rows.to(device), attn.to(device)
    eps = relative_epsilon(cost, rows, cols, scale=0.1)
    return cost, rows, cols, eps


def ours(cost, rows, cols, eps, iters):
    return sinkhorn(cost, rows, cols, epsilon=eps, n_iters=iters, grad="envelope")


def pot_padded(solve_batch, cost, rows, cols, eps, iters):
    """POT on the padded batch: padding gets zero marginal weight (one scalar eps: POT takes one)."""
    a, b = masked_marginal(rows), masked_marginal(cols)
    return solve_batch(cost, reg=float(eps.mean()), a=a, b=b, max_iter=iters, tol=0.0,
                       method="log_sinkhorn", grad="envelope")


def feature_check(solve_batch, device: str) -> dict:
    cost, rows, cols, eps = problem(3, 64, device)
    eps = eps.mean().expand(3)        # POT: one eps for the batch
    ref = ours(cost, rows, cols, eps, 200).plan.detach()
    out = {}
    try:
        res = pot_padded(solve_batch, cost, rows, cols, eps, 200)
        plan = res.plan.detach()
        out["padded_marginals_finite"] = bool(torch.isfinite(plan).all())
        out["padded_max_abs_diff"] = float((torch.nan_to_num(plan, nan=1.0) - ref).abs().max())
    except Exception as e:  # noqa: BLE001 - report whatever POT raises
        out["padded_error"] = f"{type(e).__name__}: {e}"
    diffs = []
    for b in range(3):
        m, n = int(rows[b].sum()), int(cols[b].sum())
        sub = cost.detach()[b:b + 1, :m, :n]
        res = solve_batch(sub, reg=float(eps[0]), max_iter=200, tol=0.0, method="log_sinkhorn", grad="detach")
        diffs.append(float((res.plan - ref[b:b + 1, :m, :n]).abs().max()))
    out["unpadded_one_by_one_max_abs_diff"] = max(diffs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--iters", type=int, nargs="+", default=[50, 100])
    add_common_args(p, memory=False)
    args = p.parse_args(argv)
    if args.device == "cpu":
        configure_cpu(args.threads, not args.keep_denormals)
    solve_batch = _pot()
    print(machine())
    rows_out = []
    if solve_batch is None:
        print("POT (ot.batch) is not installed: timing ours only (pip install 'pot>=0.9.6').")
    else:
        import ot
        check = feature_check(solve_batch, args.device)
        print(f"POT {ot.__version__} feature check (3 padded examples, L = 64, 200 iterations): {check}")
        rows_out.append({"feature_check": check, "pot": ot.__version__})
    print("| L | iterations | row | median ms | min ms | x ours |")
    print("|---|---|---|---|---|---|")
    for L in args.lengths:
        cost, rows, cols, eps = problem(args.batch, L, args.device)
        for iters in args.iters:
            def run(fn):
                def step():
                    cost.grad = None
                    fn().sum().backward()
                return step
            fns = {"ours": run(lambda: ours(cost, rows, cols, eps, iters).value)}
            if solve_batch is not None:
                fns["pot"] = run(lambda: pot_padded(solve_batch, cost, rows, cols, eps, iters).value_linear)
            sync(args.device)
            times = time_interleaved(fns, args.device, args.repeats)
            base = summary(times["ours"])["median_ms"]
            for name, t in times.items():
                s = summary(t)
                print(f"| {L} | {iters} | {name} | {s['median_ms']:.1f} | {s['min_ms']:.1f} | "
                      f"{s['median_ms'] / base:.2f} |")
                rows_out.append({"L": L, "iters": iters, "row": name, **s})
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
