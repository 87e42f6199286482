"""PNG plots of the tiny comparison (matplotlib, Agg backend; no display needed).

* :func:`plot_loss_curves`: student CE (``nll_loss``, comparable across criteria) and the total
  training loss against the optimizer step, mean over seeds per method, from each run's
  ``metrics.jsonl`` (written by the training loop every ``--log-interval`` steps).
* :func:`plot_scores`: ROUGE-L per method with the std over seeds as error bars, one panel per
  setting, the teacher as a dashed line, from ``table.csv`` of ``mckd.tiny.compare``.
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


def plot_scores(table_csv: Path, png: Path) -> None:
    """Bar chart of ``table.csv``: ROUGE-L mean with std error bars, per setting."""
    plt = _pyplot()
    with open(table_csv) as fh:
        rows = list(csv.DictReader(fh))
    settings = [s for s in ("same", "cross") if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, s in zip(axes[0], settings):
        rs = [r for r in rows if r["setting"] == s and r["method"] != "teacher"]
        xs = range(len(rs))
        ax.bar(xs, [float(r["rougeL_mean"]) for r in rs], yerr=[float(r["rougeL_std"]) for r in rs],
               capsize=4, color=["grey" if r["method"] == "sft" else "tab:blue" for r in rs])
        ax.set_xticks(list(xs), [r["method"] for r in rs], rotation=30, ha="right")
        for r in rows:
            if r["setting"] == s and r["method"] == "teacher":
                ax.axhline(float(r["rougeL_mean"]), ls="--", color="tab:red", label="teacher")
                ax.legend()
        lo = min(float(r["rougeL_mean"]) - float(r["rougeL_std"] or 0) for r in rs)
        ax.set_ylim(max(0.0, lo - 3), None)
        ax.set_ylabel("ROUGE-L (test)")
        ax.set_title(f"{s} vocabulary")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", png)
