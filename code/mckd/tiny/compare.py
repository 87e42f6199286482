"""The paper's comparison in miniature: SFT and every method on the embedded default, >= 3 seeds.

Usage (``scripts/tiny/compare.sh`` and ``scripts/tiny/tune.sh`` wrap it)::

    python -m mckd.tiny.compare compare --seeds 10 20 30 --jobs 2          # test split, final table
    python -m mckd.tiny.compare tune --jobs 2                               # kd_rate grid on dev
    python -m mckd.tiny.compare compare --smoke --out /tmp/smoke            # every method, a few steps

Two settings, as in the DSKD / MCW-KD papers:

* ``same`` (same vocabulary): the teacher ``model_hub/tiny/teacher_same_vocab`` shares the student's
  tokenizer; SFT, vanilla KD (forward KL) and DSKD (which needs position-aligned tokens);
* ``cross`` (cross vocabulary, DESIGN section 6): the Llama-style teacher with its own tokenizer;
  SFT, DSKD-CMA, MinED, ULD, Multi-Level OT and MCW-KD.

Every training stage is ``scripts/tiny/train.sh`` (so ``code/distillation.py`` with the tiny
defaults), every evaluation ``code/evaluate.py run`` with the published sampling protocol. Stages
run ``--jobs`` at a time (single-threaded processes are fastest on a small shared CPU), each as soon
as what it needs is there: a student starts when its own teacher is trained (SFT students at once),
an evaluation when its checkpoint exists, the most expensive ready stage first. A stage whose
directory already holds a finished run, and an evaluation already written, are reused.

Outputs under ``--out``: ``<method>/seed<k>/`` runs, ``table.{md,csv}`` (mean +- sample std over
training seeds of the per-seed ROUGE-L, itself the mean over the evaluation seeds), ``scores.csv``
(every run), ``loss_curves.png`` and ``scores.png`` (``mckd.tiny.plots``), ``timing.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mckd.train.checkpoint import run_state
from mckd.train.rundir import set_aside

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[3]
TEACHERS = {"same": "teacher_same_vocab", "cross": "teacher"}


@dataclass(frozen=True)
class Method:
    """One row of the table: a criterion in a setting with its hyper-parameters.

    Attributes:
        label: row name (also the run directory name).
        criterion: ``--criterion`` of code/distillation.py.
        setting: "same" or "cross" (which teacher; "both" for SFT, which has none).
        kd_rate: lambda (None: SFT). kd_temp: KD temperature.
        extra: extra code/distillation.py flags (word-split).
    """

    label: str
    criterion: str
    setting: str
    kd_rate: float | None = None
    kd_temp: float | None = None
    extra: str = ""


# kd_rate of each method in the comparison. Each method keeps its published loss combination:
# (1 - l) CE + l KD for vanilla KD, DSKD, DSKD-CMA, MinED and ULD; CE + l KD for Multi-Level OT and
# MCW-KD. Temperatures as published (2.0; MCW-KD and Multi-Level OT 3.0). Every rate is the best
# point on the dev split (dev ROUGE-L, one training seed) of the grid of scripts/tiny/tune.sh:
# 0.2/0.5/0.8 for the interpolated methods, 0.1/0.5 for DSKD-CMA, 0.3/1.0 for Multi-Level OT and
# 5.0/0.5/0 for MCW-KD (0 = CE + the two OT terms, no CMA term). docs/RESULTS.md has the dev table.
TUNED = {
    "vanilla_kd": 0.8,
    "dskd": 0.2,
    "dskd_cma": 0.1,
    "mined": 0.2,
    "uld": 0.2,
    "multi_level_ot": 1.0,
    "mcw_kd": 0.0,
}
PUBLISHED = {"vanilla_kd": 0.5, "dskd": 0.5, "dskd_cma": 0.5, "mined": 0.5, "uld": 0.5,
             "multi_level_ot": 1.0, "mcw_kd": 5.0}
CRITERIA = {"vanilla_kd": ("various_divergence", "same", 2.0),
            "dskd": ("dual_space_kd", "same", 2.0),
            "dskd_cma": ("dual_space_kd_with_cma", "cross", 2.0),
            "mined": ("min_edit_dis_kld", "cross", 2.0),
            "uld": ("universal_logit_distillation", "cross", 2.0),
            "multi_level_ot": ("multi_level_ot", "cross", 3.0),
            "mcw_kd": ("mcw_kd", "cross", 3.0)}
ORDER = ["sft", *CRITERIA]


def methods(rates: dict | None = None) -> list[Method]:
    """SFT plus every method at ``rates`` (default :data:`TUNED`)."""
    rates = {**TUNED, **(rates or {})}
    out = [Method("sft", "cross_entropy", "both")]
    for label, (crit, setting, temp) in CRITERIA.items():
        out.append(Method(label, crit, setting, rates[label], temp))
    return out


@dataclass
class Stage:
    """One training run: a method (or a teacher SFT) with one seed into ``run_dir``."""

    name: str
    run_dir: Path
    env: dict
    weight: float = 1.0          # relative cost, to start the long stages first
    teacher: "Stage | None" = None  # a student's teacher stage (its checkpoint is the teacher)
    ckpt: str | None = None
    seconds: float = 0.0
    log: list = field(default_factory=list)


@dataclass(eq=False)
class Task:
    """A unit of work for :func:`run_tasks`: ``fn()`` once every task in ``after`` is done."""

    name: str
    fn: Callable[[], Any]
    weight: float = 1.0
    after: tuple = ()
    result: Any = None


def run_tasks(tasks: list[Task], jobs: int) -> None:
    """Run ``tasks`` ``jobs`` at a time, each as soon as the tasks it needs are done, the heaviest
    ready task first. The first failure is raised once the running tasks have ended."""
    pending = sorted(tasks, key=lambda t: -t.weight)
    done: set = set()
    running: dict = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for t in [t for t in pending if all(a in done for a in t.after)]:
                if len(running) >= max(1, jobs):
                    break
                pending.remove(t)
                running[pool.submit(t.fn)] = t
            if not running:
                raise RuntimeError(f"run_tasks: {[t.name for t in pending]} wait on tasks not in the list")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                t = running.pop(f)
                t.result = f.result()   # raises the task's exception (the pool waits for the others)
                done.add(t)


def best_checkpoint(run_dir: Path) -> str | None:
    """Best checkpoint under ``run_dir`` (scripts/lib/find_checkpoint.py), or None."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts/lib/find_checkpoint.py"), str(run_dir)],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


def finished(run_dir: Path) -> bool:
    """True when the run in ``run_dir`` recorded its end (:func:`mckd.train.checkpoint.run_state`);
    an unfinished run is resumed, a diverged one moved aside and retrained, never reused."""
    return run_state(run_dir).status == "finished"


def _train(stage: Stage) -> Stage:
    if stage.teacher is not None:
        stage.env["TEACHER_MODEL_PATH"] = stage.teacher.ckpt
    ckpt = best_checkpoint(stage.run_dir) if finished(stage.run_dir) else None
    if ckpt:
        logger.info("%s: reusing %s", stage.name, ckpt)
        stage.ckpt = ckpt
        return stage
    env = {"PYTHON": sys.executable,   # the stages use this interpreter unless PYTHON says otherwise
           **os.environ, "GPUS": "", "OMP_NUM_THREADS": "1", "SAVE_PATH": str(stage.run_dir),
           **{k: str(v) for k, v in stage.env.items()}}
    if run_state(stage.run_dir).status == "diverged":
        logger.info("%s: the run diverged; moved to %s, retraining", stage.name, set_aside(stage.run_dir))
    if run_state(stage.run_dir).status == "unfinished":
        env["RESUME"] = "1"   # an interrupted run: continue it
    stage.run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = stage.run_dir.parent / f"{stage.run_dir.name}.log"
    with open(log, "w") as fh:
        r = subprocess.run(["bash", str(ROOT / "scripts/tiny/train.sh")], env=env, stdout=fh,
                           stderr=subprocess.STDOUT)
    stage.seconds = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{stage.name}: scripts/tiny/train.sh failed (exit {r.returncode}); see {log}")
    stage.ckpt = best_checkpoint(stage.run_dir)
    if not stage.ckpt:
        raise RuntimeError(f"{stage.name}: no checkpoint in {stage.run_dir}; see {log}")
    logger.info("%s: trained in %.0f s -> %s", stage.name, stage.seconds, stage.ckpt)
    return stage


def evaluate(ckpt: str, data_dir: Path, seeds: list[int], num: int, out_dir: str | None = None,
             max_new_tokens: int = 64) -> dict:
    """``code/evaluate.py run`` on ``<data_dir>/tiny/valid.jsonl``; returns its results.json entry."""
    cmd = [sys.executable, str(ROOT / "code/evaluate.py"), "run", "--ckpt", ckpt,
           "--data-dir", str(data_dir), "--datasets", "tiny", "--seeds", *map(str, seeds),
           "--eval-batch-size", "50", "--max-prompt-length", "128", "--max-new-tokens",
           str(max_new_tokens), "--dev-num", str(num), "--device", "cpu", "--log-level", "WARNING",
           "--no-lm-loss"]
    if out_dir:
        cmd += ["--out-dir", out_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "code")}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    res = json.loads((Path(out_dir or Path(ckpt) / "eval") / "results.json").read_text())
    return res["datasets"]["tiny"]


def seed_score(res: dict, seeds: list[int]) -> float:
    """Mean ROUGE-L over the evaluation ``seeds`` of one results.json dataset entry."""
    return statistics.fmean(float(res["seeds"][str(s)]["rougeL"]) for s in seeds)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def teacher_stages(out: Path, teacher_epoch: int, extra: str) -> list[Stage]:
    return [Stage(f"teacher {t}", out / t / "sft" / "run", weight=10.0,
                  env={"MODEL": t, "CRITERION": "cross_entropy", "EPOCH": teacher_epoch,
                       "EXTRA_ARGS": extra})
            for t in TEACHERS.values()]


def student_stage(m: Method, seed: int, run_dir: Path, teachers: dict, epoch: int,
                  extra: str) -> Stage:
    """The training stage of method ``m`` with ``seed``; ``teachers`` maps a teacher name to its
    stage (its checkpoint is read when the student starts)."""
    env = {"MODEL": "student", "CRITERION": m.criterion, "EPOCH": epoch, "SEED": seed,
           "EXTRA_ARGS": f"{m.extra} {extra}".strip()}
    after = None
    if m.kd_rate is not None:
        after = teachers[TEACHERS[m.setting]]
        env.update(TEACHER_MODEL_NAME=TEACHERS[m.setting], KD_RATE=m.kd_rate, KD_TEMP=m.kd_temp)
    cost = {"cross_entropy": 1.0, "mcw_kd": 5.0, "multi_level_ot": 3.0,
            "dual_space_kd_with_cma": 3.0}.get(m.criterion, 2.0)
    return Stage(f"{m.label} seed {seed}", run_dir, env, weight=cost, teacher=after)


def write_table(rows: list[dict], path: Path, teachers: dict, n_eval: int) -> str:
    """Markdown + CSV table: one line per (setting, method), mean +- std over training seeds.

    Args:
        rows: ``{"setting", "method", "kd_rate", "seed", "score"}`` per trained student.
        path: output prefix (``path.md``, ``path.csv``).
        teachers: setting -> teacher ROUGE-L (mean over evaluation seeds).
        n_eval: number of test examples (for the caption).
    """
    groups: dict = {}
    for r in rows:
        settings = ("same", "cross") if r["setting"] == "both" else (r["setting"],)
        for s in settings:
            groups.setdefault((s, r["method"]), []).append(r)
    lines = ["| setting | method | kd_rate | seeds | ROUGE-L (mean ± std) | vs SFT |",
             "|---|---|---|---|---|---|"]
    csv_rows = []
    for s in ("same", "cross"):
        if s in teachers:
            lines.append(f"| {s} | teacher ({TEACHERS[s]}, SFT) | | 1 | {teachers[s]:.2f} | |")
            csv_rows.append([s, "teacher", "", 1, f"{teachers[s]:.4f}", "", ""])
        sft = groups.get((s, "sft"))
        sft_mu = mean_std([r["score"] for r in sft])[0] if sft else None
        for m in ORDER:
            g = groups.get((s, m))
            if not g:
                continue
            mu, sd = mean_std([r["score"] for r in g])
            delta = "" if m == "sft" or sft_mu is None else f"{mu - sft_mu:+.2f}"
            rate = "" if g[0]["kd_rate"] is None else f"{g[0]['kd_rate']:g}"
            lines.append(f"| {s} | {m} | {rate} | {len(g)} | {mu:.2f} ± {sd:.2f} | {delta} |")
            csv_rows.append([s, m, rate, len(g), f"{mu:.4f}", f"{sd:.4f}", delta])
    md = "\n".join(lines) + f"\n\nROUGE-L on {n_eval} test prompts; std over training seeds.\n"
    path.with_suffix(".md").write_text(md)
    with open(path.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["setting", "method", "kd_rate", "n_seeds", "rougeL_mean", "rougeL_std", "delta_vs_sft"])
        w.writerows(csv_rows)
    return md


def _common(args, settings: set) -> tuple[Path, str, dict]:
    """Build the assets; returns (out, extra student args, teacher name -> teacher stage) for the
    teachers of ``settings`` (trained, or reused, by the caller's task graph)."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    build = [sys.executable, "-m", "mckd.tiny.build", "--out", str(ROOT), *args.build_args.split()]
    subprocess.run(build, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "code")})
    names = {TEACHERS[s] for s in settings if s in TEACHERS}
    stages = [t for t in teacher_stages(Path(args.teacher_out).resolve(), args.teacher_epoch,
                                        args.teacher_args) if t.env["MODEL"] in names]
    return out, args.train_args, {t.env["MODEL"]: t for t in stages}


def _graph(teachers: dict, students: list[Stage], evals: list[tuple[Stage, Callable]]) -> list[Task]:
    """Tasks: each teacher, each student after its teacher, each evaluation after its stage."""
    train = {id(st): Task(st.name, lambda st=st: _train(st), st.weight)
             for st in [*teachers.values(), *students]}
    for st in students:
        if st.teacher is not None:
            train[id(st)].after = (train[id(st.teacher)],)
    ev = [Task(f"eval {st.name}", fn, 0.5, (train[id(st)],)) for st, fn in evals]
    return [*train.values(), *ev]


def cmd_compare(args) -> None:
    t_start = time.time()
    rates = dict(kv.split("=") for kv in args.rate)
    ms = [m for m in methods({k: float(v) for k, v in rates.items()}) if m.label in args.methods]
    out, extra, tstage = _common(args, set(TEACHERS))
    stages = [(m, s, student_stage(m, s, out / m.label / f"seed{s}", tstage, args.student_epoch, extra))
              for m in ms for s in args.seeds]
    test_dir = ROOT / "data"

    def ev(st):
        return lambda: evaluate(st.ckpt, test_dir, args.eval_seeds, args.eval_num,
                                max_new_tokens=args.max_new_tokens)

    ordered = [tstage[t] for t in TEACHERS.values()] + [st for _, _, st in stages]
    evals = [(st, ev(st)) for st in ordered]
    tasks = _graph(tstage, [st for _, _, st in stages], evals)
    run_tasks(tasks, args.jobs)
    res = [t.result for t in tasks[-len(evals):]]
    t_teach = max(st.seconds for st in tstage.values())
    t_train = sum(st.seconds for st in ordered)
    teachers = {s: seed_score(res[i], args.eval_seeds) for i, s in enumerate(TEACHERS)}
    rows = [{"setting": m.setting, "method": m.label, "kd_rate": m.kd_rate, "seed": s,
             "score": seed_score(r, args.eval_seeds), "ckpt": st.ckpt, "train_s": round(st.seconds, 1)}
            for (m, s, st), r in zip(stages, res[len(TEACHERS):])]
    with open(out / "scores.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    n = res[0]["n_examples"]
    md = write_table(rows, out / "table", teachers, n)
    timing = {"total_s": round(time.time() - t_start), "jobs": args.jobs,
              "longest_teacher_s": round(t_teach), "training_s_summed_over_stages": round(t_train),
              "stages_s": {st.name: round(st.seconds) for st in ordered},
              "seeds": args.seeds, "eval_seeds": args.eval_seeds}
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    try:
        from mckd.tiny.plots import plot_loss_curves, plot_scores
        plot_loss_curves([(m.label, st.run_dir) for m, _, st in stages], out / "loss_curves.png")
        plot_scores(out / "table.csv", out / "scores.png")
    except Exception as e:  # noqa: BLE001 - plots are a convenience; the table is the result
        logger.warning("plots failed: %s", e)
    print(md)
    print(f"timing: {json.dumps(timing)}")


def cmd_tune(args) -> None:
    """Grid over kd_rate (and MCW-KD variants) with one seed; dev ROUGE-L of the best checkpoint."""
    labels = {spec.split(":")[0] for spec in args.grid}
    out, extra, tstage = _common(args, {CRITERIA[lab][1] for lab in labels if lab in CRITERIA})
    dev_root = out / "dev_data"
    (dev_root / "tiny").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "data/tiny/dev.jsonl", dev_root / "tiny/valid.jsonl")
    grid = []
    for spec in args.grid:
        # label:rate[:extra flags with commas for spaces], e.g. "mcw_kd:0:--mcw-w-hidden,0"
        parts = spec.split(":", 2)
        label, rate = parts[0], float(parts[1])
        flags = parts[2].replace(",", " ") if len(parts) > 2 else ""
        crit, setting, temp = ("cross_entropy", "both", None) if label == "sft" else CRITERIA[label]
        m = Method(label, crit, setting, None if label == "sft" else rate, temp, flags)
        name = spec.replace(":", "__").replace(",", "_").replace("--", "").replace("/", "_")
        grid.append((spec, m, student_stage(m, args.seeds[0], out / name, tstage, args.student_epoch,
                                            extra)))

    def ev(st):
        return lambda: evaluate(st.ckpt, dev_root, args.eval_seeds, args.eval_num,
                                out_dir=str(Path(st.ckpt) / "eval-dev"), max_new_tokens=args.max_new_tokens)

    tasks = _graph(tstage, [st for *_, st in grid], [(st, ev(st)) for *_, st in grid])
    run_tasks(tasks, args.jobs)
    res = [t.result for t in tasks[-len(grid):]]
    lines = ["| method | kd_rate | flags | dev ROUGE-L | train s |", "|---|---|---|---|---|"]
    for (spec, m, st), r in zip(grid, res):
        lines.append(f"| {m.label} | {m.kd_rate if m.kd_rate is not None else ''} | {m.extra} | "
                     f"{seed_score(r, args.eval_seeds):.2f} | {st.seconds:.0f} |")
    md = "\n".join(lines) + "\n"
    with open(out / "tune.md", "a") as fh:
        fh.write(md)
    print(md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("compare", "tune"):
        s = sub.add_parser(name)
        s.add_argument("--out", default=str(ROOT / "outputs/tiny" / name))
        s.add_argument("--teacher-out", default=str(ROOT / "outputs/tiny"),
                       help="teachers are trained (or reused) in <teacher-out>/<teacher>/sft/run")
        s.add_argument("--jobs", type=int, default=2, help="stages run at the same time")
        s.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30], help="training seeds")
        s.add_argument("--eval-seeds", type=int, nargs="+", default=[10], help="sampling seeds")
        s.add_argument("--eval-num", type=int, default=-1, help="test/dev examples (-1: all)")
        s.add_argument("--max-new-tokens", type=int, default=64)
        s.add_argument("--teacher-epoch", type=int, default=4)
        s.add_argument("--student-epoch", type=int, default=1)
        s.add_argument("--train-args", default="", help="extra distillation.py flags of every student")
        s.add_argument("--teacher-args", default="", help="extra distillation.py flags of the teachers")
        s.add_argument("--build-args", default="", help="extra mckd.tiny.build flags")
        s.add_argument("--log-level", default="INFO")
    c = sub.choices["compare"]
    c.add_argument("--methods", nargs="+", default=ORDER, choices=ORDER)
    c.add_argument("--rate", action="append", default=[], metavar="METHOD=RATE",
                   help="override a tuned kd_rate, e.g. --rate mcw_kd=0.5")
    t = sub.choices["tune"]
    t.add_argument("grid", nargs="+", help="METHOD:RATE[:FLAGS] with commas for spaces in FLAGS")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    {"compare": cmd_compare, "tune": cmd_tune}[args.cmd](args)


if __name__ == "__main__":
    main()
