"""The dev tuning table of docs/RESULTS.md from outputs/tiny/tune.

Run from the repository root: python scripts/tiny/dev_table.py
"""
import json, pathlib, subprocess, sys
root = pathlib.Path("outputs/tiny/tune")
print("| point (method:kd_rate[:flags]) | dev ROUGE-L (200, 2 sampling seeds) | dev loss | dev acc | train nll @250 |")
print("|---|---|---|---|---|")
for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "dev_data"):
    m = d / "metrics.jsonl"
    if not m.exists():
        continue
    rs = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
    dev = [r for r in rs if r.get("split") == "dev"]
    tr = [r for r in rs if "split" not in r]
    if not dev:
        continue
    c = subprocess.run([sys.executable, "scripts/lib/find_checkpoint.py", str(d)], capture_output=True, text=True).stdout.strip()
    import statistics
    vals = [json.loads(f.read_text())["rougeL"] for f in sorted((pathlib.Path(c) / "eval-dev" / "tiny").glob("seed*/metrics.json"))]
    rouge = f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else (f"{vals[0]:.2f} (1 seed)" if vals else "")
    print(f"| {d.name.replace('__', ':')} | {rouge} | {dev[-1]['loss']:.3f} | {dev[-1]['accuracy']:.3f} | {tr[-1]['nll_loss']:.3f} |")
