"""PNG plots of the tiny comparison (matplotlib, Agg backend; no display needed).

* :func:`plot_loss_curves`: student CE (``nll_loss``, comparable across criteria) and the total
  training loss against the optimizer step, mean over seeds per method, from each run's
  ``metrics.jsonl`` (written by the training loop every ``--log-interval`` steps).
* :func:`plot_differences`: each method's paired difference to SFT with its 95% interval, per
  setting and score, from ``table.csv`` of ``scripts/tiny/compare.py``.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_curve(run_dir: Path, key: str) -> dict[int, float]:
    """``step -> value`` of ``key`` in the training records of ``run_dir/metrics.jsonl``."""
    out = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("split") is None and key in rec:
            out[int(rec["step"])] = float(rec[key])
    return out


def plot_loss_curves(runs: list[tuple[str, Path]], png: Path) -> None:
    """Mean-over-seeds training curves of every method (``runs``: (method label, run dir) pairs)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "nll_loss", "student CE on the labels (nll_loss)"),
                           (axes[1], "loss", "total training loss")):
        by_method: dict = defaultdict(list)
        for label, run_dir in runs:
            curve = read_curve(run_dir, key)
            if curve:
                by_method[label].append(curve)
        for label, curves in by_method.items():
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [sum(c[s] for c in curves) / len(curves) for s in steps], label=label)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", png)


def plot_differences(table_csv: Path, png: Path) -> None:
    """Paired differences to SFT with their 95% intervals (``table.csv`` of
    ``scripts/tiny/compare.py``): one panel per setting and score."""
    plt = _pyplot()
    with open(table_csv) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("rougeL_diff")]
    settings = [s for s in ("same", "cross") if any(r["setting"] == s for r in rows)]
    keys = (("rougeL", "sampled ROUGE-L"), ("rougeL_greedy", "greedy ROUGE-L"), ("test_nll", "test NLL"))
    fig, axes = plt.subplots(len(settings), len(keys), figsize=(15, 4 * len(settings)), squeeze=False)
    for i, s in enumerate(settings):
        rs = [r for r in rows if r["setting"] == s]
        for ax, (key, name) in zip(axes[i], keys):
            mids = [float(r[f"{key}_diff"]) for r in rs]
            err = [[m - float(r[f"{key}_lo"]) for m, r in zip(mids, rs)],
                   [float(r[f"{key}_hi"]) - m for m, r in zip(mids, rs)]]
            ax.errorbar(range(len(rs)), mids, yerr=err, fmt="o", capsize=4)
            ax.axhline(0.0, color="grey", lw=1)
            ax.set_xticks(range(len(rs)), [r["method"] for r in rs], rotation=30, ha="right")
            ax.set_title(f"{s} vocabulary: {name} minus SFT")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", png)
