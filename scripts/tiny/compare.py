"""The paper's comparison in miniature on the embedded default: paired seeds, intervals, controls.

    python scripts/tiny/compare.py compare                       # main table (scripts/tiny/compare.sh)
    python scripts/tiny/compare.py compare --controls-only       # cross-vocabulary methods, same teacher
    python scripts/tiny/compare.py tune                          # the dev grid (scripts/tiny/tune.sh)
    python scripts/tiny/compare.py compare --methods sft mcw_kd --seeds 10 20 30   # run.sh's job

Settings. ``same``: the teacher ``teacher_same_vocab`` shares the student's tokenizer (SFT,
vanilla KD, DSKD). ``cross``: the Llama-style teacher with its own tokenizer (DSKD-CMA, MinED,
ULD, Multi-Level OT, MCW-KD). With ``--controls`` every cross-vocabulary method also runs with
the same-vocabulary teacher (rows ``<method>@same``), which separates "the method teaches" from
"the vocabulary mismatch loses the signal".

Every stage is ``scripts/tiny/train.sh`` (so ``code/distillation.py``); every method's options come
from ``scripts/tiny/methods.tsv``. Teachers train on the teacher's corpus (``data/tiny/teacher``)
for a fixed number of epochs; students train on their subset (``data/tiny``) until the
teacher-forced dev loss has not improved for ``--patience`` epochs, and the checkpoint with the
lowest dev loss is evaluated on the test split (``code/evaluate.py``): the published sampling
protocol once per sampling seed (``--eval-seeds``, with the teacher-forced test NLL of the drawn
reference), and greedy decoding. Stages run ``--jobs`` at a time as a task graph (students start
when their teacher is trained, evaluations when their checkpoint exists); finished stages and
evaluations are reused, unfinished ones resumed.

Outputs under ``--out``: ``scores.csv`` (every run), ``table.{md,csv}`` (per method: mean ± std over
training seeds and the paired difference to SFT with its 95% interval for sampled ROUGE-L,
greedy ROUGE-L and test NLL), ``loss_curves.png``, ``differences.png``, ``timing.json``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "code"))

from mckd.evaluation.results import mean_std  # noqa: E402
from mckd.evaluation.stats import detectable_effect, paired_difference  # noqa: E402
from mckd.train import checkpoint  # noqa: E402
from mckd.train.checkpoint import run_state  # noqa: E402
from mckd.train.rundir import set_aside  # noqa: E402

logger = logging.getLogger("compare")
TEACHERS = {"same": "teacher_same_vocab", "cross": "teacher"}
METHODS_TSV = ROOT / "scripts/tiny/methods.tsv"
# Relative cost of a student stage (to start the long ones first).
COST = {"cross_entropy": 1.0, "mcw_kd": 5.0, "multi_level_ot": 3.0, "dual_space_kd_with_cma": 3.0}


@dataclass(frozen=True)
class Method:
    """One row of the table: a criterion with its teacher and options.

    Attributes:
        label: row name (also the run directory name).
        criterion: ``--criterion`` of code/distillation.py.
        setting: "same" or "cross" (the teacher); "both" for SFT, which has none.
        kd_rate, kd_temp: the KD weight and temperature (None for SFT).
        flags: extra code/distillation.py flags (word-split).
    """

    label: str
    criterion: str
    setting: str
    kd_rate: float | None = None
    kd_temp: float | None = None
    flags: str = ""


def read_methods(path: Path = METHODS_TSV) -> dict[str, Method]:
    """The method table (``scripts/tiny/methods.tsv``), keyed by label, in file order."""
    out: dict[str, Method] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = line.split()
        if len(cols) != 6:
            raise ValueError(f"{path}:{lineno}: expected 6 columns (method criterion teacher kd_rate "
                             f"kd_temp flags), got {len(cols)}")
        label, crit, teacher, rate, temp, flags = cols

        def num(x):
            return None if x == "-" else float(x)

        out[label] = Method(label, crit, "both" if teacher == "-" else teacher, num(rate), num(temp),
                            "" if flags == "-" else flags.replace(",", " "))
    return out


# The on-policy variant of a method (GKD's mixture): with probability 0.5 a batch's responses are
# replaced by the student's own samples (T = 1, at most 64 new tokens, the answers' length here).
ON_POLICY_FLAGS = "--on-policy-ratio 0.5 --on-policy-temperature 1.0 --on-policy-max-new-tokens 64"


def on_policy(m: Method) -> Method:
    """``m`` trained partly on the student's own samples (:data:`ON_POLICY_FLAGS`)."""
    return replace(m, label=f"{m.label}+on_policy", flags=f"{m.flags} {ON_POLICY_FLAGS}".strip())


def control(m: Method) -> Method:
    """The same-vocabulary control of a cross-vocabulary method."""
    return replace(m, label=f"{m.label}@same", setting="same")


# ----------------------------------------------------------------------------- task graph
@dataclass
class Stage:
    """One training run into ``run_dir`` (``env``: scripts/tiny/train.sh variables)."""

    name: str
    run_dir: Path
    env: dict
    weight: float = 1.0
    teacher: "Stage | None" = None  # a student's teacher stage (its checkpoint is the teacher)
    ckpt: str | None = None
    seconds: float = 0.0
    threads: int = 1  # torch threads of its process (the numbers do not depend on it)


@dataclass(eq=False)
class Task:
    """A unit of work for :func:`run_tasks`: ``fn()`` once every task in ``after`` is done."""

    name: str
    fn: Callable[[], Any]
    weight: float = 1.0
    after: tuple = ()
    result: Any = None
    threads: int = 1  # cores it occupies


def run_tasks(tasks: list[Task], jobs: int) -> None:
    """Run ``tasks`` on ``jobs`` cores, each as soon as the tasks it needs are done, the heaviest
    ready task first; a task occupies ``threads`` cores (at most ``jobs``), and a task that does
    not fit waits, with the lighter ones behind it, for cores to free. The first failure is
    raised once the running tasks have ended."""
    jobs = max(1, jobs)
    pending = sorted(tasks, key=lambda t: -t.weight)
    done: set = set()
    running: dict = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for t in [t for t in pending if all(a in done for a in t.after)]:
                if sum(min(r.threads, jobs) for r in running.values()) + min(t.threads, jobs) > jobs:
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
    """Best checkpoint under ``run_dir`` (lowest dev loss: these runs score no generations), or None."""
    best = checkpoint.best_checkpoint([run_dir])
    return str(best) if best is not None else None


def assets_record(run_dir: Path) -> Path:
    """Where a run keeps the manifest of the assets it was trained on (beside its log)."""
    return Path(run_dir).parent / f"{Path(run_dir).name}.assets.json"


def stale(run_dir: Path) -> bool:
    """True when the run's models and data differ from today's assets: the manifest recorded at
    its start differs from ``model_hub/tiny/manifest.json`` (runs without a record: the assets
    were rebuilt after the run started)."""
    manifest, args = ROOT / "model_hub/tiny/manifest.json", Path(run_dir) / "args.json"
    if not manifest.is_file() or not args.is_file():
        return False
    record = assets_record(run_dir)
    if record.is_file():
        return record.read_text() != manifest.read_text()
    return manifest.stat().st_mtime > args.stat().st_mtime


def train(stage: Stage) -> Stage:
    """Train ``stage`` with scripts/tiny/train.sh: a finished run (as its run state records) is
    reused, an unfinished one resumed, a diverged or stale one moved aside and retrained."""
    if stage.teacher is not None:
        stage.env["TEACHER_MODEL_PATH"] = stage.teacher.ckpt
    state = run_state(stage.run_dir).status
    if state != "empty" and stale(stage.run_dir):
        state = "stale"
    ckpt = best_checkpoint(stage.run_dir) if state == "finished" else None
    if ckpt:
        logger.info("%s: reusing %s", stage.name, ckpt)
        stage.ckpt = ckpt
        return stage
    env = {"PYTHON": sys.executable, **os.environ, "GPUS": "", "OMP_NUM_THREADS": str(stage.threads),
           "SAVE_PATH": str(stage.run_dir), **{k: str(v) for k, v in stage.env.items()}}
    if state in ("diverged", "stale", "finished"):   # finished without a usable checkpoint too
        logger.info("%s: the run is %s; moved to %s, retraining", stage.name, state,
                    set_aside(stage.run_dir))
    elif state == "unfinished":
        logger.info("%s: resuming the unfinished run in %s", stage.name, stage.run_dir)
        env["RESUME"] = "1"   # an interrupted run: continue it
    stage.run_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "model_hub/tiny/manifest.json", assets_record(stage.run_dir))
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


def evaluate(ckpt: str, data_dir: Path, seeds: list[int], num: int, out_dir: Path, *,
             greedy: bool = False, max_new_tokens: int = 64) -> dict:
    """``code/evaluate.py run`` on ``<data_dir>/tiny/valid.jsonl``; returns its results.json entry."""
    cmd = [sys.executable, str(ROOT / "code/evaluate.py"), "run", "--ckpt", ckpt,
           "--data-dir", str(data_dir), "--datasets", "tiny", "--seeds", *map(str, seeds),
           "--eval-batch-size", "50", "--max-prompt-length", "128", "--max-new-tokens",
           str(max_new_tokens), "--dev-num", str(num), "--device", "cpu", "--log-level", "WARNING",
           "--out-dir", str(out_dir)]
    if greedy:
        cmd += ["--greedy", "--no-lm-loss"]
    # the request of a finished evaluation is recorded beside it: the same request again (same
    # arguments, same data bytes) reads the results without starting evaluate.py, whose own check
    # of its finished pairs decides in every other case
    data = Path(data_dir) / "tiny" / "valid.jsonl"
    request = {"argv": cmd[2:], "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest()
               if data.is_file() else None}
    results, marker = out_dir / "results.json", out_dir / "request.json"
    if not (results.is_file() and marker.is_file() and json.loads(marker.read_text()) == request):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "code")}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        marker.write_text(json.dumps(request, indent=1))
    return json.loads(results.read_text())["datasets"]["tiny"]


def scores(sampled: dict, greedy: dict, seeds: list[int]) -> dict:
    """Sampled ROUGE-L (mean over sampling seeds), greedy ROUGE-L and test NLL of one checkpoint."""
    per_seed = [float(sampled["seeds"][str(s)]["rougeL"]) for s in seeds]
    nll = sampled["seeds"][str(seeds[0])].get("lm_loss")
    return {"rougeL": statistics.fmean(per_seed), "rougeL_per_seed": " ".join(f"{x:.4f}" for x in per_seed),
            "rougeL_greedy": float(next(iter(greedy["seeds"].values()))["rougeL"]),
            "test_nll": float(nll) if nll is not None else float("nan")}


def dev_record(run_dir: Path) -> dict:
    """Best teacher-forced dev loss of a run and the step count it trained."""
    losses, steps = [], 0
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        steps = max(steps, int(rec.get("step", 0)))
        if rec.get("split") == "dev":
            losses.append(float(rec["loss"]))
    return {"dev_loss": min(losses) if losses else float("nan"), "steps": steps}


# ----------------------------------------------------------------------------- stages
def teacher_stage(out: Path, name: str, epochs: int, extra: str) -> Stage:
    return Stage(f"teacher {name}", out / name / "sft" / "run", weight=10.0,
                 env={"MODEL": name, "CRITERION": "cross_entropy", "EPOCH": epochs,
                      "DATA_DIR": str(ROOT / "data/tiny/teacher"), "BATCH_SIZE": 32,
                      "EVAL_GEN": 0, "SAVE_BEST_N_CKPTS": 1, "EXTRA_ARGS": extra})


def student_stage(m: Method, seed: int, run_dir: Path, teachers: dict, args) -> Stage:
    """The training stage of method ``m`` with ``seed``; ``teachers`` maps a teacher name to its
    stage (its checkpoint is read when the student starts)."""
    flags = f"--early-stop-patience {args.patience} {args.train_args}".strip()
    env = {"MODEL": "student", "CRITERION": m.criterion, "EPOCH": args.max_epochs, "SEED": seed,
           "EVAL_GEN": 0, "DEV_NUM": -1, "SAVE_BEST_N_CKPTS": 1, "EXTRA_ARGS": flags,
           "METHOD_FLAGS": m.flags}
    after = None
    if m.criterion != "cross_entropy":
        after = teachers[TEACHERS[m.setting]]
        env.update(TEACHER_MODEL_NAME=TEACHERS[m.setting], KD_RATE=m.kd_rate, KD_TEMP=m.kd_temp)
    return Stage(f"{m.label} seed {seed}", run_dir, env, weight=COST.get(m.criterion, 2.0), teacher=after)


def build_assets(args) -> None:
    cmd = [sys.executable, "-m", "mckd.tiny.build", "--out", str(ROOT), *args.build_args.split()]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "code")})


def graph(teachers: dict, students: list[Stage], evals: list[tuple[Stage, Callable]]) -> list[Task]:
    """Tasks: each teacher, each student after its teacher, each evaluation after its stage."""
    tasks = {id(st): Task(st.name, lambda st=st: train(st), st.weight, threads=st.threads)
             for st in [*teachers.values(), *students]}
    for st in students:
        if st.teacher is not None:
            tasks[id(st)].after = (tasks[id(st.teacher)],)
    ev = [Task(f"eval {st.name}", fn, 0.5, (tasks[id(st)],)) for st, fn in evals]
    return [*tasks.values(), *ev]


def run_grid(points: list[tuple[Method, int, Path]], args, data_dir: Path, eval_name: str) -> list[dict]:
    """Train every (method, seed, run_dir) point with the teachers it needs, evaluate its best
    checkpoint (sampled with ``args.eval_seeds`` and greedy) on ``<data_dir>/tiny/valid.jsonl``
    into ``<ckpt>/<eval_name>[-greedy]``; returns one row per point plus one per teacher."""
    build_assets(args)
    needed = {TEACHERS[m.setting] for m, _, _ in points if m.criterion != "cross_entropy"}
    tstages = {t: teacher_stage(Path(args.teacher_out), t, args.teacher_epoch, args.teacher_args)
               for t in TEACHERS.values() if t in needed}
    for st in tstages.values():  # the teachers come first and share the cores (one teacher: all)
        st.threads = max(1, args.jobs // len(tstages))
    students = [student_stage(m, s, d, tstages, args) for m, s, d in points]

    if args.eval_num != -1:  # a subset: never reuse or clash with the full evaluation's files
        eval_name = f"{eval_name}-n{args.eval_num}"

    def ev(st):
        def fn():
            ck = Path(st.ckpt)
            kw = dict(max_new_tokens=args.max_new_tokens)
            sampled = evaluate(st.ckpt, data_dir, args.eval_seeds, args.eval_num, ck / eval_name, **kw)
            greedy = evaluate(st.ckpt, data_dir, [args.eval_seeds[0]], args.eval_num,
                              ck / f"{eval_name}-greedy", greedy=True, **kw)
            return scores(sampled, greedy, args.eval_seeds)
        return fn

    everything = [*tstages.values(), *students]
    tasks = graph(tstages, students, [(st, ev(st)) for st in everything])
    run_tasks(tasks, args.jobs)
    results = [t.result for t in tasks[-len(everything):]]
    rows = []
    for (name, st), res in zip(tstages.items(), results):
        setting = next(k for k, v in TEACHERS.items() if v == name)
        rows.append({"method": "teacher", "setting": setting, "kd_rate": "", "seed": "", **res,
                     **dev_record(st.run_dir), "train_s": round(st.seconds, 1), "ckpt": st.ckpt})
    for (m, seed, _), st, res in zip(points, students, results[len(tstages):]):
        rows.append({"method": m.label, "setting": m.setting, "kd_rate": "" if m.kd_rate is None else m.kd_rate,
                     "seed": seed, **res, **dev_record(st.run_dir), "train_s": round(st.seconds, 1),
                     "ckpt": st.ckpt})
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------- table
COLUMNS = (("rougeL", "sampled ROUGE-L", 1.0), ("rougeL_greedy", "greedy ROUGE-L", 1.0),
           ("test_nll", "test NLL", -1.0))  # (key, name, +1 when higher is better)


def write_table(rows: list[dict], path: Path, n_eval: int, n_sampling: int) -> str:
    """Markdown + CSV: per setting and method, mean ± std over training seeds of each score and
    the paired difference to SFT (same training seeds) with its 95% interval.

    Args:
        rows: scores.csv rows (``method``, ``setting``, ``seed``, the score keys of :data:`COLUMNS`).
        path: output prefix (``path.md``, ``path.csv``).
        n_eval, n_sampling: test prompts and sampling seeds behind each sampled score (caption).
    """
    def group(setting, method):
        return {int(r["seed"]): r for r in rows if r["method"] == method
                and r["setting"] in (setting, "both") and r["seed"] != ""}

    lines, out_rows, sds = [], [], {k: [] for k, _, _ in COLUMNS}
    for setting in ("same", "cross"):
        methods = list(dict.fromkeys(r["method"] for r in rows
                                     if r["setting"] == setting and r["method"] != "teacher"))
        if not methods:
            continue
        sft = group(setting, "sft")
        lines += [f"\n**{setting} vocabulary** (teacher: {TEACHERS[setting]})\n",
                  "| method | kd_rate | seeds | " + " | ".join(
                      f"{name} | Δ vs SFT [95% CI]" for _, name, _ in COLUMNS) + " |",
                  "|---|---|---|" + "---|---|" * len(COLUMNS)]
        teacher = [r for r in rows if r["method"] == "teacher" and r["setting"] == setting]
        if teacher:
            t = teacher[0]
            lines.append("| teacher | | | " + " | ".join(f"{float(t[k]):.3f} | " if k == "test_nll" else
                                                      f"{float(t[k]):.2f} | " for k, _, _ in COLUMNS) + "|")
        for m in ["sft", *[x for x in methods if x != "sft"]]:
            g = group(setting, m)
            if not g:
                continue
            rate = next(iter(g.values()))["kd_rate"]
            cells, rec = [], {"setting": setting, "method": m, "n_seeds": len(g),
                              "kd_rate": "" if rate in ("", None) else f"{float(rate):g}"}
            for key, _, _ in COLUMNS:
                digits = 3 if key == "test_nll" else 2
                mu, sd = mean_std([float(r[key]) for r in g.values()])
                rec.update({f"{key}_mean": round(mu, 4), f"{key}_std": round(sd, 4)})
                shared = sorted(set(g) & set(sft))
                diff = ""
                if m != "sft" and len(shared) >= 2:
                    d = paired_difference([float(g[s][key]) for s in shared],
                                          [float(sft[s][key]) for s in shared])
                    sds[key].append(d.sd)
                    diff = d.format(digits)
                    rec.update({f"{key}_diff": round(d.mean, 4), f"{key}_lo": round(d.lo, 4),
                                f"{key}_hi": round(d.hi, 4)})
                cells.append(f"{mu:.{digits}f} ± {sd:.{digits}f} | {diff}")
            lines.append(f"| {m} | {rec['kd_rate']} | {len(g)} | " + " | ".join(cells) + " |")
            out_rows.append(rec)
    lines += mismatch_lines(rows, group, out_rows)
    n = max((r["n_seeds"] for r in out_rows), default=0)
    mde = []
    for key, name, _ in COLUMNS:
        if sds[key]:
            sd = statistics.median(sds[key])
            mde.append(f"{name} {detectable_effect(sd, n):.{3 if key == 'test_nll' else 2}f}")
    md = ("\n".join(lines) + f"\n\nMean ± std over {n} training seeds; Δ: mean paired difference to SFT "
          f"(same training seed) with its 95% t interval, * where it excludes 0 (for the NLL, lower "
          f"is better). Sampled ROUGE-L: the published protocol on {n_eval} test prompts, mean over "
          f"{n_sampling} sampling seeds; greedy ROUGE-L: greedy decoding; test NLL: teacher-forced "
          f"loss of the drawn reference. Smallest effect this design detects (paired t-test, "
          f"level 0.05, power 0.8, median paired std over methods): {', '.join(mde) or 'n/a'}.\n")
    path.with_suffix(".md").write_text(md)
    if out_rows:
        keys = list(dict.fromkeys(k for r in out_rows for k in r))
        with open(path.with_suffix(".csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(out_rows)
    return md


def mismatch_lines(rows: list[dict], group: Callable, out_rows: list[dict]) -> list[str]:
    """The cost of the vocabulary mismatch: per cross-vocabulary method run with both teachers,
    its control (``<method>@same``) minus its cross-vocabulary run, paired by training seed (same
    data order and initialisation), with the 95% interval; appends its records to ``out_rows``."""
    pairs = [(r["method"][:-len("@same")], r["method"]) for r in rows if r["method"].endswith("@same")]
    pairs = [(m, c) for m, c in dict.fromkeys(pairs) if group("cross", m) and group("same", c)]
    if not pairs:
        return []
    lines = ["\n**cost of the vocabulary mismatch** (`<method>@same` minus `<method>`, paired by "
             "training seed; > 0 in ROUGE-L and < 0 in NLL: the same-vocabulary teacher teaches more)\n",
             "| method | seeds | " + " | ".join(f"Δ {name} [95% CI]" for _, name, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for m, c in pairs:
        cross, same = group("cross", m), group("same", c)
        shared = sorted(set(cross) & set(same))
        if len(shared) < 2:
            continue
        rec, cells = {"setting": "mismatch", "method": m, "n_seeds": len(shared)}, []
        for key, _, _ in COLUMNS:
            d = paired_difference([float(same[s][key]) for s in shared], [float(cross[s][key]) for s in shared])
            cells.append(d.format(3 if key == "test_nll" else 2))
            rec.update({f"{key}_diff": round(d.mean, 4), f"{key}_lo": round(d.lo, 4), f"{key}_hi": round(d.hi, 4)})
        lines.append(f"| {m} | {len(shared)} | " + " | ".join(cells) + " |")
        out_rows.append(rec)
    return lines


# ----------------------------------------------------------------------------- commands
def cmd_compare(args) -> None:
    t0 = time.time()
    table = read_methods()
    unknown = [m for m in args.methods if m not in table]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {list(table)}")
    chosen = [table[m] for m in args.methods]
    unknown = [m for m in args.on_policy if m not in table or m == "sft"]
    if unknown:
        raise SystemExit(f"--on-policy: unknown or not a KD method: {unknown}; known: {list(table)[1:]}")
    chosen += [on_policy(table[m]) for m in args.on_policy]
    if args.controls or args.controls_only:
        controls = [control(m) for m in chosen if m.setting == "cross" and "+on_policy" not in m.label]
        chosen = ([table["sft"]] + controls) if args.controls_only else chosen + controls
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    points = [(m, s, out / m.label / f"seed{s}") for m in chosen for s in args.seeds]
    rows = run_grid(points, args, ROOT / "data", "eval")
    write_csv(rows, out / "scores.csv")
    md = write_table(rows, out / "table", n_eval=args.eval_num if args.eval_num > 0 else 300,
                     n_sampling=len(args.eval_seeds))
    stage_s = {(f"teacher {r['setting']}" if r["method"] == "teacher" else f"{r['method']} seed {r['seed']}"):
               r["train_s"] for r in rows}
    timing = {"total_s": round(time.time() - t0), "jobs": args.jobs, "stages_s": stage_s,
              "training_s_summed_over_stages": round(sum(stage_s.values())),
              "seeds": args.seeds, "eval_seeds": args.eval_seeds}
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    try:
        from mckd.tiny.plots import plot_differences, plot_loss_curves

        plot_loss_curves([(m.label, d) for m, _, d in points], out / "loss_curves.png")
        plot_differences(out / "table.csv", out / "differences.png")
    except Exception as e:  # noqa: BLE001 - plots are a convenience; the table is the result
        logger.warning("plots failed: %s", e)
    print(md)
    print(f"timing: {json.dumps({k: v for k, v in timing.items() if k != 'stages_s'})}")


# The dev grid: every method gets the same number of dev runs (3): its kd_rate grid (2 points) at
# the default of its one main knob, plus the knob's other value at the larger rate. SFT: learning
# rate 2e-3 / 4e-3, plus label smoothing 0.1 at 4e-3; ULD, which has no temperature: CE + lambda ULD
# instead of the published (1 - lambda) CE + lambda ULD. (label, flag of the grid, its values, knob
# flag, default, other value); "none" leaves the flag out.
GRID = {
    "sft": ("--lr", ["2e-3", "4e-3"], "--label-smoothing", "none", "0.1"),
    "vanilla_kd": ("--kd-rate", ["0.5", "0.9"], "--kd-temperature", "2.0", "1.0"),
    "dskd": ("--kd-rate", ["0.5", "0.9"], "--kd-temperature", "2.0", "1.0"),
    "dskd_cma": ("--kd-rate", ["0.5", "0.9"], "--clip-grad-criterion", "none", "1.0"),
    "mined": ("--kd-rate", ["0.5", "0.9"], "--kd-temperature", "2.0", "1.0"),
    "uld": ("--kd-rate", ["0.5", "0.9"], "--loss-combination", "none", "additive"),
    "multi_level_ot": ("--kd-rate", ["0.5", "2.0"], "--mlot-temperature", "none", "1.0"),
    "mcw_kd": ("--kd-rate", ["0", "1.0"], "--mcw-exact-kl-weight", "none", "1.0"),
    "dskd_v2": ("--kd-rate", ["0.5", "0.9"], "--kd-temperature", "2.0", "1.0"),
    "uld_hybrid": ("--kd-rate", ["0.5", "0.9"], "--uld-hybrid-beta", "none", "0.5"),
    "dwa_kd": ("--kd-rate", ["0.5", "0.9"], "--dwa-dtw-rate", "none", "0.1"),
}


def grid_points(label: str, base: Method) -> list[Method]:
    """The dev runs of one method (see :data:`GRID`)."""
    flag, values, knob, default, other = GRID[label]
    points = [(v, default) for v in values] + [(values[-1], other)]
    words = base.flags.split()
    if knob in words:   # a value chosen earlier: the grid sets the knob itself
        i = words.index(knob)
        del words[i:i + 2]
    base = replace(base, flags=" ".join(words))
    out = []
    for v, k in points:
        m = base
        flags = []
        for f, x in ((flag, v), (knob, k)):
            if x == "none":
                continue
            if f == "--kd-rate":
                m = replace(m, kd_rate=float(x))
            elif f == "--kd-temperature":
                m = replace(m, kd_temp=float(x))
            else:
                flags.append(f"{f} {x}")
        name = f"{label}__{flag.lstrip('-')}_{v}__{knob.lstrip('-')}_{k}"
        out.append(replace(m, label=name, flags=" ".join([base.flags, *flags]).strip()))
    return out


def cmd_tune(args) -> None:
    table = read_methods()
    out = Path(args.out).resolve()
    dev_root = out / "dev_data"
    (dev_root / "tiny").mkdir(parents=True, exist_ok=True)
    build_assets(args)
    shutil.copyfile(ROOT / "data/tiny/dev.jsonl", dev_root / "tiny/valid.jsonl")
    labels = args.methods or list(GRID)
    points = [(p, args.seeds[0], out / p.label) for lab in labels for p in grid_points(lab, table[lab])]
    rows = run_grid(points, args, dev_root, "eval-dev")
    for (m, _, _), r in zip(points, [r for r in rows if r["method"] != "teacher"]):
        r["flags"] = m.flags
    # tune.csv keeps the points of earlier calls (other methods); a point run again replaces its row
    path = out / "tune.csv"
    if path.is_file():
        key = lambda r: (r["method"], r["setting"])  # noqa: E731
        with open(path, newline="") as fh:
            old = {key(r): r for r in csv.DictReader(fh)}
        old.update({key(r): r for r in rows})
        rows = list(old.values())
    fields = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in fields} for r in rows]
    write_csv(rows, path)
    lines = ["| point | flags | dev ROUGE-L (sampled) | dev greedy | dev NLL | best dev loss | steps |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["method"] != "teacher"), key=lambda r: r["method"]):
        lines.append(f"| {r['method']} | {r['flags']} | {float(r['rougeL']):.2f} | "
                     f"{float(r['rougeL_greedy']):.2f} | {float(r['test_nll']):.3f} | "
                     f"{float(r['dev_loss']):.3f} | {r['steps']} |")
    md = "\n".join(lines) + "\n"
    (out / "tune.md").write_text(md)
    print(md)


def cmd_choose(args) -> None:
    """Pick each method's dev point (the best mean sampled dev ROUGE-L of its grid in tune.csv)
    and print, or with ``--write`` store, its row of methods.tsv."""
    table = read_methods()
    path = Path(args.tune_csv)
    if not path.is_file():
        raise SystemExit(f"compare.py choose: {path} does not exist; run scripts/tiny/tune.sh first")
    with open(path, newline="") as fh:
        scored = {r["method"]: r for r in csv.DictReader(fh)}
    chosen = {}
    for lab in GRID:
        if lab == "sft" or lab not in table:   # SFT's grid sets the students' learning rate
            continue
        points = [q for q in grid_points(lab, table[lab]) if q.label in scored]
        if not points:
            continue
        if len(points) < 3:
            logger.warning("%s: only %d of its 3 dev points are in %s", lab, len(points), path)
        best = max(points, key=lambda q: float(scored[q.label]["rougeL"]))
        chosen[lab] = replace(best, label=lab)
        print(f"{lab}: {best.label} (dev ROUGE-L {float(scored[best.label]['rougeL']):.2f}) -> "
              f"kd_rate {best.kd_rate}, kd_temp {best.kd_temp}, flags {best.flags or '-'}")
    if not args.write:
        return
    lines = METHODS_TSV.read_text().splitlines()
    for i, line in enumerate(lines):
        cols = line.split()
        if line.lstrip().startswith("#") or len(cols) != 6 or cols[0] not in chosen:
            continue
        m = chosen[cols[0]]
        cols[3] = "0" if m.kd_rate == 0 else repr(float(m.kd_rate))
        cols[4] = repr(float(m.kd_temp)) if m.kd_temp is not None else "-"
        cols[5] = m.flags.replace(" ", ",") if m.flags else "-"
        lines[i] = f"{cols[0]:<18}{cols[1]:<30}{cols[2]:<9}{cols[3]:<9}{cols[4]:<9}{cols[5]}"
    METHODS_TSV.write_text("\n".join(lines) + "\n")
    print(f"wrote {METHODS_TSV}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("compare", "tune"):
        s = sub.add_parser(name)
        s.add_argument("--out", default=str(ROOT / "outputs/tiny" / name))
        s.add_argument("--teacher-out", default=str(ROOT / "outputs/tiny"),
                       help="teachers are trained (or reused) in <teacher-out>/<teacher>/sft/run")
        s.add_argument("--jobs", type=int, default=2, help="stages run at the same time")
        s.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50],
                       help="training seeds (paired across methods)")
        s.add_argument("--eval-seeds", type=int, nargs="+", default=[10, 20, 30], help="sampling seeds")
        s.add_argument("--eval-num", type=int, default=-1, help="test/dev examples (-1: all)")
        s.add_argument("--max-new-tokens", type=int, default=64)
        s.add_argument("--teacher-epoch", type=int, default=3)
        s.add_argument("--max-epochs", type=int, default=12, help="student epochs at most")
        s.add_argument("--patience", type=int, default=2,
                       help="stop a student when its dev loss has not improved for this many epochs")
        s.add_argument("--train-args", default="", help="extra distillation.py flags of every student")
        s.add_argument("--teacher-args", default="", help="extra distillation.py flags of the teachers")
        s.add_argument("--build-args", default="", help="extra mckd.tiny.build flags")
        s.add_argument("--log-level", default="INFO")
    c = sub.choices["compare"]
    c.add_argument("--methods", nargs="+", default=list(read_methods()))
    c.add_argument("--controls", action="store_true",
                   help="also run every cross-vocabulary method with the same-vocabulary teacher")
    c.add_argument("--controls-only", action="store_true", help="SFT and the controls only")
    c.add_argument("--on-policy", nargs="*", default=[], metavar="METHOD",
                   help="also run these methods on-policy (label <method>+on_policy; flags: "
                        + ON_POLICY_FLAGS + ")")
    t = sub.choices["tune"]
    t.add_argument("--methods", nargs="+", default=None, choices=list(GRID))
    ch = sub.add_parser("choose", help="each method's best dev point (from tune.csv) into methods.tsv")
    ch.add_argument("--tune-csv", default=str(ROOT / "outputs/tiny/tune/tune.csv"))
    ch.add_argument("--write", action="store_true", help="rewrite the chosen rows of methods.tsv")
    ch.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    {"compare": cmd_compare, "tune": cmd_tune, "choose": cmd_choose}[args.cmd](args)


if __name__ == "__main__":
    main()
