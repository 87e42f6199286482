"""Aggregating per-pair metrics into results files, and the cross-run comparison table.

``results.json`` (one evaluation directory)::

    {"datasets": {"<dataset>": {"seeds": {"10": {"rougeL": .., "exact_match": .., "avg_gen_len": ..}, ..},
                                "n_seeds": 5, "rougeL_mean": .., "rougeL_std": .., "exact_match_mean": ..,
                                "exact_match_std": .., "avg_gen_len_mean": ..}},
     "average": {"rougeL": .., "exact_match": .., "avg_gen_len": .., "n_datasets": ..}}

``std`` is the sample standard deviation over seeds (ddof=1; 0 for a single seed). The average is
the unweighted mean over datasets of the per-dataset means, as the papers report it.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

METRICS = ("rougeL", "exact_match", "avg_gen_len")
# The papers' column order; datasets not listed follow alphabetically.
CANONICAL_ORDER = ("dolly", "self-inst", "vicuna", "sinst/11_", "uinst/11_", "dialogsum")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def order_datasets(names) -> list[str]:
    names = set(names)
    return [d for d in CANONICAL_ORDER if d in names] + sorted(names - set(CANONICAL_ORDER))


def collect_pairs(eval_dir: str | Path) -> dict[str, dict[int, dict]]:
    """Read every ``<dataset>/seed<k>/metrics.json`` under ``eval_dir`` -> {dataset: {seed: metrics}}."""
    eval_dir = Path(eval_dir)
    found: dict[str, dict[int, dict]] = {}
    for mfile in sorted(eval_dir.rglob("seed*/metrics.json")):
        m = json.loads(mfile.read_text())
        ds = m.get("dataset") or str(mfile.parent.parent.relative_to(eval_dir))
        found.setdefault(ds, {})[int(m["seed"])] = m
    return found


def aggregate(pairs: dict[str, dict[int, dict]]) -> dict:
    """Mean/std over seeds per dataset and the average over datasets (see module docstring)."""
    datasets = {}
    for ds in order_datasets(pairs):
        seeds = dict(sorted(pairs[ds].items()))
        entry: dict = {"seeds": {str(s): {k: m[k] for k in METRICS + ("lm_loss",) if k in m} for s, m in seeds.items()},
                       "n_seeds": len(seeds), "n_examples": next(iter(seeds.values())).get("n")}
        for k in METRICS:
            mu, sd = mean_std([m[k] for m in seeds.values()])
            entry[f"{k}_mean"], entry[f"{k}_std"] = round(mu, 4), round(sd, 4)
        datasets[ds] = entry
    avg = {k: round(sum(e[f"{k}_mean"] for e in datasets.values()) / len(datasets), 4) if datasets else math.nan
           for k in METRICS}
    avg["n_datasets"] = len(datasets)
    return {"datasets": datasets, "average": avg}


def results_markdown(results: dict, title: str = "") -> str:
    """A small per-run table: one row per dataset, plus the average."""
    lines = [f"# {title}" if title else "# Evaluation results", "",
             "| dataset | seeds | n | ROUGE-L | EM | avg. gen. length |", "|---|---|---|---|---|---|"]
    for ds, e in results["datasets"].items():
        lines.append(f"| {ds} | {e['n_seeds']} | {e['n_examples']} | {e['rougeL_mean']:.2f} ± {e['rougeL_std']:.2f} "
                     f"| {e['exact_match_mean']:.2f} ± {e['exact_match_std']:.2f} "
                     f"| {e['avg_gen_len_mean']:.1f} |")
    a = results["average"]
    if results["datasets"]:
        lines.append(f"| **average** | | | **{a['rougeL']:.2f}** | {a['exact_match']:.2f} | {a['avg_gen_len']:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(eval_dir: str | Path, run_config: dict | None = None) -> dict:
    """Aggregate everything under ``eval_dir`` into ``results.json`` and ``results.md``."""
    eval_dir = Path(eval_dir)
    res = aggregate(collect_pairs(eval_dir))
    if run_config is not None:
        res["last_run"] = run_config
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (eval_dir / "results.md").write_text(results_markdown(res, title=f"Evaluation of {eval_dir.parent}"))
    return res


def load_results(path: str | Path) -> dict:
    """``results.json`` from a file, an eval directory, or a checkpoint (its ``eval/``); aggregates on
    the fly when only per-pair files exist."""
    p = Path(path)
    for cand in (p, p / "results.json", p / "eval" / "results.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    for d in (p, p / "eval"):
        if d.is_dir() and any(d.rglob("seed*/metrics.json")):
            return aggregate(collect_pairs(d))
    raise FileNotFoundError(f"no results.json or <dataset>/seed<k>/metrics.json under {p}")


def default_names(paths: Sequence[str | Path]) -> list[str]:
    """Shortest distinct path suffixes, e.g. ``sft/epoch3_step100`` vs ``kd/epoch3_step100``."""
    parts = [Path(p).resolve().parts for p in paths]
    parts = [pp[:-1] if pp and pp[-1] == "results.json" else pp for pp in parts]  # .../eval/results.json
    parts = [pp[:-1] if pp and pp[-1] in ("eval", "eval-greedy") else pp for pp in parts]  # .../ckpt/eval
    for k in range(1, max((len(pp) for pp in parts), default=1) + 1):
        names = ["/".join(pp[-k:]) for pp in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def compare(paths: Sequence[str | Path], names: Sequence[str] | None = None, metric: str = "rougeL",
            datasets: Sequence[str] | None = None) -> tuple[str, str]:
    """The paper-style table: rows = runs, columns = datasets, plus the average.

    Args:
        paths: checkpoints, eval directories or results.json files.
        names: row labels (default: shortest distinct path suffixes).
        metric: ``rougeL``, ``exact_match`` or ``avg_gen_len``.
        datasets: columns (default: every dataset seen, paper order). The average of a row is over
            these columns; a run missing one of them gets ``-`` there and no average.

    Returns:
        ``(markdown, csv_text)``; the CSV has ``<dataset>_mean``/``<dataset>_std`` columns.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
    names = list(names) if names else default_names(paths)
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    runs = [load_results(p) for p in paths]
    cols = list(datasets) if datasets else order_datasets({d for r in runs for d in r["datasets"]})
    md = ["| run | " + " | ".join(cols) + " | avg |", "|---" * (len(cols) + 2) + "|"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run"] + [f"{c}_{s}" for c in cols for s in ("mean", "std")] + ["avg"])
    for name, r in zip(names, runs):
        cells, row, means = [], [name], []
        for c in cols:
            e = r["datasets"].get(c)
            if e is None:
                cells.append("-")
                row += ["", ""]
                continue
            mu, sd = e[f"{metric}_mean"], e[f"{metric}_std"]
            means.append(mu)
            cells.append(f"{mu:.2f} ± {sd:.2f}" if e["n_seeds"] > 1 else f"{mu:.2f}")
            row += [mu, sd]
        avg = round(sum(means) / len(means), 4) if means and len(means) == len(cols) else None
        md.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if avg is None else f'{avg:.2f}'} |")
        w.writerow(row + ["" if avg is None else avg])
    return "\n".join(md) + "\n", buf.getvalue()
