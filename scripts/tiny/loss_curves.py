#!/usr/bin/env python
"""Record or check the first optimizer steps of every criterion on the embedded default.

Each method of scripts/tiny/methods.tsv (plus a few option variants) is trained for a handful of
steps with the command scripts/tiny/train.sh builds (run in one process), from the random-init tiny models of model_hub/tiny (built by
``python -m mckd.tiny.build``), and every logged number of every step (loss, CE, KD, gradient
norm, learning rate, criterion statistics) and the final dev loss are collected. CPU training is
deterministic, so the same code gives the same numbers to the bit; a refactoring that must not
change behaviour is checked by recording before it and checking after it::

    python scripts/tiny/loss_curves.py --out outputs/tiny/loss_curves.json           # before
    python scripts/tiny/loss_curves.py --check outputs/tiny/loss_curves.json         # after

``--check`` exits with status 1 and lists every number that differs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (label, criterion, extra distillation.py flags) beyond the rows of methods.tsv: options that
# take another code path
VARIANTS = (
    ("vanilla_kd_rkl_ls", "various_divergence", "--kd-objective reverse_kl --label-smoothing 0.1"),
    ("mcw_kd_reference", "mcw_kd", "--mcw-preset reference --kd-rate 0.5"),
    ("mcw_kd_exact", "mcw_kd", "--exact-align --mcw-positions response"),
    ("multi_level_ot_published", "multi_level_ot", "--mlot-variant published"),
    ("uld_hybrid_exact", "uld_hybrid", "--uld-hybrid-positions exact --uld-hybrid-beta 0.5"),
    ("dwa_kd_exact", "dwa_kd", "--dwa-token-alignment exact"),
    ("dskd_v2_linear", "dual_space_kd_v2", "--dskdv2-s2t linear --dskdv2-projector-init random"),
    ("dskd_cma_interpolate", "dual_space_kd_with_cma",
     "--loss-combination interpolate --kd-temperature-scaling --no-cma-t2s-accuracy-mask"),
)
TEACHERS = {"same": "teacher_same_vocab", "cross": "teacher"}
# wall-clock numbers are not behaviour
SKIP_KEYS = ("tokens_per_s",)


def methods() -> list[tuple[str, str, str, str]]:
    """(label, criterion, teacher kind, extra flags) of every run."""
    rows = []
    for line in (ROOT / "scripts/tiny/methods.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        label, crit, teacher, *_ = line.split()
        rows.append((label, crit, teacher, ""))
    kinds = {crit: teacher for _, crit, teacher, _ in rows}
    rows += [(label, crit, kinds[crit], flags) for label, crit, flags in VARIANTS]
    return rows


def command(crit: str, teacher: str, flags: str, out: Path, steps: int) -> list[str]:
    """The code/distillation.py arguments scripts/tiny/train.sh builds for one short run."""
    env = dict(os.environ, MODEL="student", CRITERION=crit, SAVE_PATH=str(out), EPOCH="1",
               EVAL_GEN="0", DEV_NUM="8", BATCH_SIZE="8", SEED="10", DRY_RUN="1",
               EXTRA_ARGS=f"--train-num {8 * steps} --max-steps {steps} --log-interval 1 "
                          f"--eval-interval 0 --save-interval 0 {flags}".strip())
    if teacher != "-":
        name = TEACHERS[teacher]
        env.update(TEACHER_MODEL_PATH=str(ROOT / "model_hub/tiny" / name), TEACHER_MODEL_NAME=name)
    proc = subprocess.run(["bash", str(ROOT / "scripts/tiny/train.sh")], env=env,
                          capture_output=True, text=True, check=True)
    words = shlex.split(proc.stdout.strip().splitlines()[-1])
    return words[[i for i, w in enumerate(words) if w.endswith("distillation.py")][0] + 1:]


def run_one(label: str, argv: list[str], out: Path) -> dict:
    """Train in this process (one import of the library for all runs) and read metrics.jsonl."""
    sys.path.insert(0, str(ROOT / "code"))
    import distillation  # noqa: E402  (code/distillation.py)

    status = distillation.main(argv)
    if status != 0:
        raise RuntimeError(f"{label}: training failed with status {status}")
    curve: dict[str, list] = {"train": [], "dev": []}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        split = rec.pop("split", "train")
        curve[split].append({k: v for k, v in rec.items() if k not in SKIP_KEYS})
    return curve


def differences(ref: dict, now: dict) -> list[str]:
    diffs = []
    for label in sorted(set(ref) | set(now)):
        if label not in now or label not in ref:
            diffs.append(f"{label}: only in {'the record' if label in ref else 'this run'}")
            continue
        for split in ("train", "dev"):
            a, b = ref[label][split], now[label][split]
            if len(a) != len(b):
                diffs.append(f"{label} {split}: {len(a)} records before, {len(b)} now")
            for ra, rb in zip(a, b):
                for k in sorted(set(ra) | set(rb)):
                    va, vb = ra.get(k), rb.get(k)
                    same = va == vb or (isinstance(va, float) and isinstance(vb, float)
                                        and math.isnan(va) and math.isnan(vb))
                    if not same:
                        diffs.append(f"{label} {split} step {ra.get('step')}: {k} {va!r} -> {vb!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the curves to this JSON file")
    g.add_argument("--check", help="compare with the curves recorded in this JSON file")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per method")
    p.add_argument("--only", nargs="+", default=None, help="labels to run (default: all)")
    args = p.parse_args(argv)
    if not (ROOT / "model_hub/tiny/student/config.json").is_file():
        p.error("model_hub/tiny is missing: run `python -m mckd.tiny.build` first")
    rows = [r for r in methods() if args.only is None or r[0] in args.only]
    ref = json.loads(Path(args.check).read_text()) if args.check else None
    curves = {}
    with tempfile.TemporaryDirectory(prefix="mckd-curves-") as tmp:
        for label, crit, teacher, flags in rows:
            out = Path(tmp) / label
            curves[label] = run_one(label, command(crit, teacher, flags, out, args.steps), out)
            print(f"{label}: loss {[r.get('loss') for r in curves[label]['train']]}", flush=True)
    if ref is None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(curves, indent=1) + "\n")
        print(f"wrote {len(curves)} curves to {args.out}")
        return 0
    ref = {k: v for k, v in ref.items() if k in curves}
    diffs = differences(ref, curves)
    for d in diffs:
        print(d)
    n = sum(len(c["train"]) for c in curves.values())
    print(f"{len(curves)} methods, {n} training steps: "
          + ("identical to the record" if not diffs else f"{len(diffs)} differences"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
