"""The dev tuning table of docs/RESULTS.md from outputs/tiny/tune.

Run from the repository root: python scripts/tiny/dev_table.py
"""
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path("outputs/tiny/tune")


def dev_rouge(run_dir: pathlib.Path) -> str:
    """Mean ± std over sampling seeds of the dev ROUGE-L of the run's best checkpoint."""
    ckpt = subprocess.run([sys.executable, "scripts/lib/find_checkpoint.py", str(run_dir)],
                          capture_output=True, text=True).stdout.strip()
    files = sorted((pathlib.Path(ckpt) / "eval-dev" / "tiny").glob("seed*/metrics.json"))
    vals = [json.loads(f.read_text())["rougeL"] for f in files]
    if len(vals) > 1:
        return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"
    return f"{vals[0]:.2f} (1 seed)" if vals else ""


print("| point (method:kd_rate[:flags]) | dev ROUGE-L (200, 2 sampling seeds) | dev loss | dev acc | train nll @250 |")
print("|---|---|---|---|---|")
for d in sorted(p for p in ROOT.iterdir() if p.is_dir() and p.name != "dev_data"):
    metrics = d / "metrics.jsonl"
    if not metrics.exists():
        continue
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    dev = [r for r in rows if r.get("split") == "dev"]
    train = [r for r in rows if "split" not in r]
    if dev:
        print(f"| {d.name.replace('__', ':')} | {dev_rouge(d)} | {dev[-1]['loss']:.3f} | "
              f"{dev[-1]['accuracy']:.3f} | {train[-1]['nll_loss']:.3f} |")
