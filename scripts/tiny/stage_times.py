"""Wall time of every training stage of the tiny comparison, from each run's log timestamps.

Run from the repository root: python scripts/tiny/stage_times.py
"""
import datetime as dt, pathlib, re, statistics
def ts(line):
    return dt.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
rows = {}
dirs = [pathlib.Path(p) for p in ("outputs/tiny/teacher/sft/run", "outputs/tiny/teacher_same_vocab/sft/run")]
dirs += sorted(pathlib.Path("outputs/tiny/compare").glob("*/seed*"))
for d in dirs:
    if not d.is_dir() or not (d / "train.log").exists():
        continue
    lines = [l for l in (d / "console.log").read_text(errors="replace").splitlines() if re.match(r"\d{4}-\d\d-\d\d ", l)]
    done = [l for l in (d / "train.log").read_text().splitlines() if "training done" in l]
    if lines and done:
        rows.setdefault(d.parent.name if "seed" in d.name else d.parts[-3], []).append(((ts(done[-1]) - ts(lines[0])).total_seconds(), ts(lines[0]), ts(done[-1])))
tot = 0
for k, v in rows.items():
    s = [x[0] for x in v]; tot += sum(s)
    print(f"{k:18s} n={len(v)} mean {statistics.fmean(s)/60:.1f} min  (sum {sum(s)/60:.1f} min)")
allt = [x for v in rows.values() for x in v]
print(f"sum of stage times {tot/60:.1f} min; first start {min(x[1] for x in allt)}, last end {max(x[2] for x in allt)}")
