"""The prepared GPU check: everything a real run executes on CUDA, in one command, in minutes.

Run through ``scripts/gpu_check.sh`` (which installs carried wheels first), or directly::

    python benchmarks/gpu_check.py                       # CUDA: bf16, B = 4, L = 512, full-size shapes
    python benchmarks/gpu_check.py --small               # CPU: tiny shapes, a few steps (CI)
    python benchmarks/gpu_check.py --parts criteria bench_step --out /tmp/gc

Parts (each one or more subprocesses with a hard time limit; a failure or a timeout is recorded and
the next part still runs):

* ``env``: device, versions of torch / transformers / peft / deepspeed / datasets against the
  minimum versions the check accepts (``MIN_VERSIONS``).
* ``setup``: data, tokenizers and random-init models (``gpu_check_parts.py setup``).
* ``criteria``: every criterion forward + backward in bf16 (autocast and bf16 weights) against
  fp32 on the same inputs (``gpu_check_parts.py criteria``).
* ``train:<criterion>:<engine>`` for ``mcw_kd`` and ``dual_space_kd_with_cma`` with the engines
  ``torch``, ``zero2`` and ``zero3`` (DeepSpeed, one process), bf16, through the published launch
  scripts ``scripts/gpt2/{multicost,dskd_cma}_gpt2_base.sh``: half of the steps, ``RESUME=1`` for
  the rest, then ``scripts/eval/run_eval.sh`` on the final checkpoint with a few prompts (small
  mode: ``CHAINS``, every engine with ``mcw_kd`` and the torch engine with DSKD-CMA, evaluation
  after the torch and ZeRO-3 chains). The DeepSpeed chains are skipped, with the reason, when
  ``deepspeed`` cannot be imported.
* ``bench_mcw``, ``bench_step``, ``bench_criteria``, ``bench_generation``: the benchmark scripts
  with sizes that fit the budget (``BENCH_ARGS``).

``setup`` runs first; ``criteria`` and the training chains then run concurrently (nothing in them is
timed); the benchmarks run last, one at a time, alone on the device (in the small CPU mode, whose
timings mean nothing, they share the concurrent phase).

Output (``--out``, default ``outputs/gpu_check``; three files, so that a remote runner returning
only a few files gets everything): ``summary.md`` (pass/fail per part, the benchmark tables, the targets,
device and versions), ``results.json`` (every part's status, reason, time and raw rows) and
``logs.txt`` (the end of every part's console output). Scratch (models, runs, caches) goes to
``--work`` (default ``outputs/gpu_check_work``), which is emptied first.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MIN_VERSIONS = {"torch": "2.4", "transformers": "5.0", "peft": "0.15", "deepspeed": "0.19", "datasets": "3.0"}
TOTAL_BUDGET = {"gpu": 470, "small": 175}    # seconds for the whole check
BUDGET = {  # part -> (GPU seconds, small seconds): hard limits of each part (a training chain: all its runs)
    "setup": (90, 45), "criteria": (210, 60), "train": (210, 100),
    "bench_mcw": (90, 60), "bench_step": (100, 75), "bench_criteria": (60, 50), "bench_generation": (60, 50),
}
TRAIN = {"mcw_kd": "scripts/gpt2/multicost_gpt2_base.sh",
         "dual_space_kd_with_cma": "scripts/gpt2/dskd_cma_gpt2_base.sh"}
ENGINES = ("torch", "zero2", "zero3")
# (criterion, engine) training chains; the small mode keeps each engine once and each criterion once
CHAINS = {"gpu": [(c, e) for c in TRAIN for e in ENGINES],
          "small": [("mcw_kd", e) for e in ENGINES] + [("dual_space_kd_with_cma", "torch")]}
BENCH_ARGS = {
    "gpu": {
        "bench_mcw": ["--device", "cuda", "--dtype", "bf16", "--lengths", "128", "256", "512", "1024",
                      "--published-max-length", "512", "--repeats", "5", "--rows", "cross_entropy",
                      "dual_space_kd_with_cma", "mcw_ot:default", "mcw_ot:reference", "mcw_kd:default",
                      "mcw_kd:reference", "published:ot", "published"],
        "bench_step": ["--device", "cuda", "--dtype", "bf16", "--full-depth", "--lengths", "512", "--repeats", "5"],
        "bench_criteria": ["--device", "cuda", "--dtype", "bf16", "--lengths", "512", "--repeats", "3"],
        "bench_generation": ["--device", "cuda", "--size", "base", "--n", "64", "--batch-size", "32",
                             "--max-new-tokens", "128", "--loop-n", "8"],
    },
    "small": {  # tiny lengths; the benchmarks' own widths (V = 151936, D = 2048) stay
        # L = 64: at 25 rows or fewer torch.cdist takes a kernel without bf16 on CPU (the published OT uses it)
        "bench_mcw": ["--device", "cpu", "--dtype", "bf16", "--lengths", "64", "--batch", "2", "--repeats", "1",
                      "--no-memory", "--rows", "cross_entropy", "mcw_kd:reference", "published"],
        "bench_step": ["--device", "cpu", "--dtype", "bf16", "--lengths", "32", "--batch", "2", "--repeats", "1",
                       "--student-layers", "1", "--teacher-layers", "1", "--rows", "mcw_kd:default"],
        "bench_criteria": ["--device", "cpu", "--dtype", "bf16", "--lengths", "32", "--batch", "2", "--repeats",
                           "1", "--no-memory", "--rows", "cross_entropy", "min_edit_dis_kld", "mcw_kd:default"],
        "bench_generation": ["--device", "cpu", "--size", "tiny", "--n", "8", "--batch-size", "4",
                             "--max-new-tokens", "8", "--loop-n", "2", "--threads", "1"],
    },
}
TRAIN_SIZES = {  # mode -> (total steps, max length, max prompt length, eval prompts, eval new tokens)
    "gpu": (20, 512, 256, 8, 64), "small": (4, 128, 64, 2, 8)}
EVAL_ENGINES = {"gpu": ENGINES, "small": ("torch", "zero3")}  # chains that end with run_eval.sh
LOG_TAIL = 6000  # characters of each part's console output kept in logs.txt


class Check:
    """Runs the parts and records their results."""

    def __init__(self, args):
        self.args = args
        self.mode = "small" if args.small else "gpu"
        self.device = "cpu" if args.small else "cuda"
        self.out, self.work = Path(args.out).resolve(), Path(args.work).resolve()
        self.start = time.monotonic()
        self.scale = args.time_scale
        self.deadline = self.start + (args.budget or TOTAL_BUDGET[self.mode]) * self.scale
        self.results: dict[str, dict] = {}
        self.logs = self.work / "logs"

    # ------------------------------------------------------------------ running
    def env(self, **extra) -> dict:
        path = f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'code'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   PATH=path, PYTHON=PY, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1" if self.mode == "small" else "4"),
                   MCKD_CACHE_DIR=str(self.work / "cache"))
        if self.mode == "small":
            env["DS_ACCELERATOR"] = "cpu"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, float]:
        """Run ``cmd`` in its own process group, appending its output to ``log``; kill the group at
        ``timeout``. Returns (exit code, or None on timeout; seconds)."""
        timeout = min(timeout, self.remaining())
        t0 = time.monotonic()
        if timeout <= 1:
            return None, 0.0
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or self.env(), cwd=ROOT,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = None
                f.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
        return rc, time.monotonic() - t0

    def part(self, name: str, fn) -> dict:
        """Run one part (``fn(log) -> dict`` with at least ``status``), never raising."""
        if name.split(":")[0] not in self.args.parts and name not in self.args.parts:
            return {}
        log = self.logs / f"{name.replace(':', '-')}.log"
        t0 = time.monotonic()
        if self.remaining() <= 1:
            res = {"status": "skip", "reason": "the check's total time budget was spent"}
        else:
            try:
                res = fn(log)
            except Exception as e:  # noqa: BLE001 - reported, the next part runs
                res = {"status": "fail", "reason": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.monotonic() - t0, 1)
        res["log"] = log.name
        self.results[name] = res
        why = f" - {res['reason']}" if res.get("reason") else ""
        print(f"[gpu_check] {name}: {res['status']} ({res['seconds']} s){why}", flush=True)
        return res

    def budget(self, key: str) -> float:
        return BUDGET[key][0 if self.mode == "gpu" else 1] * self.scale

    # ------------------------------------------------------------------ parts
    def part_env(self, log: Path) -> dict:
        import importlib.metadata as md

        import torch

        versions, low = {"python": sys.version.split()[0]}, []
        for pkg, need in MIN_VERSIONS.items():
            try:
                versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                versions[pkg] = None
                if pkg != "deepspeed":
                    low.append(f"{pkg} missing")
                continue
            if _vtuple(versions[pkg]) < _vtuple(need):
                low.append(f"{pkg} {versions[pkg]} < {need}")
        cuda = torch.cuda.is_available()
        info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "cuda": torch.version.cuda,
                "cpu_count": os.cpu_count(), "versions": versions, "minimum": MIN_VERSIONS, "mode": self.mode,
                "date": time.strftime("%Y-%m-%d %H:%M %Z")}
        errors = _import_errors(self.env()) if self.mode == "gpu" else _missing_modules()
        info["import_errors"] = errors
        info["deepspeed"] = versions["deepspeed"] is not None and "deepspeed" not in errors
        low += [f"import {m} failed: {e}" for m, e in errors.items() if m != "deepspeed"]
        if cuda:
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        log.write_text(json.dumps(info, indent=1))
        if self.device == "cuda" and not cuda:
            return {"status": "fail", "reason": "CUDA is not available (run with --small on CPU)", "info": info}
        return {"status": "fail" if low else "pass", "reason": "; ".join(low), "info": info}

    def part_setup(self, log: Path) -> dict:
        cmd = [PY, "benchmarks/gpu_check_parts.py", "setup", "--work", str(self.work),
               "--tokenizers", self.args.tokenizers] + (["--small"] if self.mode == "small" else [])
        rc, _ = self.run(cmd, log, self.budget("setup"))
        if rc != 0:
            return _failed(rc, log=log)
        return {"status": "pass", "info": json.loads((self.work / "setup.json").read_text())}

    def part_criteria(self, log: Path) -> dict:
        if self.results.get("setup", {}).get("status") != "pass":
            return {"status": "skip", "reason": "setup did not pass"}
        out = self.work / "criteria.json"
        length, batch = (512, 4) if self.mode == "gpu" else (64, 2)
        cmd = [PY, "benchmarks/gpu_check_parts.py", "criteria", "--work", str(self.work), "--json", str(out),
               "--device", self.device, "--length", str(length), "--batch", str(batch)]
        rc, _ = self.run(cmd, log, self.budget("criteria"))
        if not out.is_file():
            return _failed(rc, log=log)
        data = json.loads(out.read_text())
        bad = [r["criterion"] for r in data["rows"] if r["status"] != "pass"]
        return {"status": "fail" if bad or rc != 0 else "pass",
                "reason": f"failed: {', '.join(bad)}" if bad else ("" if rc == 0 else f"exit status {rc}"),
                "data": data}

    def part_train(self, criterion: str, engine: str, log: Path) -> dict:
        if self.results.get("setup", {}).get("status") != "pass":
            return {"status": "skip", "reason": "setup did not pass"}
        if engine != "torch" and not self.results.get("env", {}).get("info", {}).get("deepspeed", True):
            return {"status": "skip", "reason": "deepspeed cannot be imported (carry its wheel: BENCHMARKS.md)"}
        steps, max_len, max_prompt, n_eval, new_tokens = TRAIN_SIZES[self.mode]
        half = steps // 2
        run_dir = self.work / "runs" / f"{criterion}-{engine}"
        models = self.work / "models"
        common = ["--total-iters", str(steps), "--interval-unit", "step", "--save-interval", str(half),
                  "--eval-interval", "0", "--log-interval", "1", "--train-num", str(steps * 4), "--num-workers", "0"]
        env = dict(GPUS="0" if self.device == "cuda" else "", PRECISION="bf16", CKPT_PATH=models / "student",
                   TEACHER_MODEL_PATH=models / "teacher", DATA_DIR=self.work / "tiny" / "data" / "tiny",
                   SAVE_PATH=run_dir, BATCH_SIZE=4, GRAD_ACC=1, MAX_LENGTH=max_len, MAX_PROMPT_LENGTH=max_prompt,
                   EVAL_GEN=0, DEV_NUM=4, MASTER_PORT=_free_port(),
                   MCKD_CACHE_DIR=self.work / "cache" / f"{criterion}-{engine}",
                   DEEPSPEED=0 if engine == "torch" else 1)
        if engine != "torch":
            env["DS_CONFIG"] = ROOT / "configs" / "deepspeed" / f"ds_config_{engine}_bf16.json"
        limit = self.budget("train")
        t_end = time.monotonic() + limit
        script = ["bash", TRAIN[criterion]]
        rc, _ = self.run(script, log, limit, self.env(**env, EXTRA_ARGS=" ".join(common + ["--max-steps", str(half)])))
        if rc != 0:
            return _failed(rc, "first run", log)
        first = _train_rows(run_dir)
        rc, _ = self.run(script, log, t_end - time.monotonic(), self.env(**env, RESUME=1, EXTRA_ARGS=" ".join(common)))
        if rc != 0:
            return _failed(rc, "resumed run", log)
        rows = _train_rows(run_dir)
        losses = [r.get("loss") for r in rows]
        checks = {
            "first run stopped at the half": [r["step"] for r in first] == list(range(1, half + 1)),
            "every step logged once": [r["step"] for r in rows] == list(range(1, steps + 1)),
            "losses finite": all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses),
            "resumed from the checkpoint": "resumed from" in _read(run_dir / "train.log"),
        }
        ckpt = subprocess.run([PY, "scripts/lib/find_checkpoint.py", str(run_dir)], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
        checks["final checkpoint"] = ckpt.endswith(f"_step{steps}")
        res = {"steps": len(rows), "loss_first": losses[0] if losses else None,
               "loss_last": losses[-1] if losses else None, "checkpoint": Path(ckpt).name if ckpt else None}
        if ckpt and engine in EVAL_ENGINES[self.mode]:
            eval_env = self.env(GPUS="0" if self.device == "cuda" else "", DATA_DIR=self.work / "tiny" / "data",
                                DATASETS="tiny", SEEDS="10", MASTER_PORT=_free_port())
            rc, _ = self.run(["bash", "scripts/eval/run_eval.sh", ckpt, "4", "--dev-num", str(n_eval),
                              "--max-new-tokens", str(new_tokens), "--max-prompt-length", str(max_prompt)],
                             log, t_end - time.monotonic(), eval_env)
            ev = Path(ckpt) / "eval" / "results.json"
            score = json.loads(ev.read_text())["average"]["rougeL"] if ev.is_file() else None
            checks["run_eval.sh wrote a finite ROUGE-L"] = rc == 0 and isinstance(score, (int, float)) \
                and math.isfinite(score)
            res["eval_rougeL"] = score
        failed = [k for k, ok in checks.items() if not ok]
        return {"status": "fail" if failed else "pass", "reason": "; ".join(f"not: {k}" for k in failed), **res}

    def part_bench(self, name: str, log: Path) -> dict:
        out = self.work / f"{name}.json"
        args = list(BENCH_ARGS[self.mode][name])
        if name == "bench_generation":
            if self.results.get("setup", {}).get("status") != "pass":
                return {"status": "skip", "reason": "setup did not pass"}
            data = self.work / "tiny" / "data" / "tiny" / "valid.jsonl"
            args += ["--hub", str(self.work / "hub"), "--data", str(data)]
        rc, _ = self.run([PY, f"benchmarks/{name}.py", *args, "--json", str(out)], log, self.budget(name))
        if rc != 0 or not out.is_file():
            return _failed(rc, log=log)
        text = out.read_text()
        rows = json.loads(text) if name != "bench_generation" else [json.loads(x) for x in text.splitlines() if x]
        return {"status": "pass", "rows": rows}

    # ------------------------------------------------------------------ all
    def main(self) -> int:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.logs.mkdir(parents=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.part("env", self.part_env)
        self.part("setup", self.part_setup)
        jobs = [("criteria", self.part_criteria)]
        jobs += [(f"train:{c}:{e}", lambda log, c=c, e=e: self.part_train(c, e, log)) for c, e in CHAINS[self.mode]]
        benches = [(n, lambda log, n=n: self.part_bench(n, log))
                   for n in ("bench_mcw", "bench_step", "bench_criteria", "bench_generation")]
        if self.mode == "small":
            jobs += benches  # CPU timings of tiny shapes mean nothing: share the cores
            benches = []
        workers = self.args.jobs or (len(jobs) if self.mode == "gpu" else 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda j: self.part(*j), jobs))
        for job in benches:  # timed: alone on the device, one at a time
            self.part(*job)
        total = round(time.monotonic() - self.start, 1)
        order = ["env", "setup", "criteria", *(f"train:{c}:{e}" for c, e in CHAINS[self.mode]),
                 "bench_mcw", "bench_step", "bench_criteria", "bench_generation"]
        self.results = {n: self.results[n] for n in order if n in self.results}
        from gpu_check_report import write_outputs

        write_outputs(self.out, self.results, self.logs, total=total, mode=self.mode, log_tail=LOG_TAIL)
        bad = [n for n, r in self.results.items() if r["status"] == "fail"]
        print(f"[gpu_check] done in {total} s: {len(self.results) - len(bad)} of {len(self.results)} parts "
              f"did not fail; summary in {self.out / 'summary.md'}", flush=True)
        return 1 if bad else 0


def _vtuple(v: str) -> tuple:
    out = []
    for x in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in x if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


RUNTIME_MODULES = ("datasets", "rapidfuzz", "rouge_score", "peft", "deepspeed")


def _missing_modules() -> dict:
    """{module: error} for the runtime modules that are not installed (found, not imported: the
    small mode saves the seconds an import of deepspeed costs on a loaded CPU)."""
    import importlib.util

    return {m: "not installed" for m in RUNTIME_MODULES if importlib.util.find_spec(m) is None}


def _import_errors(env: dict) -> dict:
    """{module: error} for the runtime modules that fail to import (one fresh interpreter)."""
    code = ("import importlib, json, sys\nerr = {}\nfor m in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(m)\n    except Exception as e:\n"
            "        err[m] = f'{type(e).__name__}: {e}'[:300]\nprint(json.dumps(err))")
    res = subprocess.run([PY, "-c", code, *RUNTIME_MODULES], env=env, capture_output=True, text=True, timeout=180)
    lines = res.stdout.strip().splitlines()
    return json.loads(lines[-1]) if res.returncode == 0 and lines else {"python": res.stderr[-300:]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failed(rc, what: str = "", log: Path | None = None) -> dict:
    why = "timed out (hard limit)" if rc is None else f"exit status {rc}"
    err = _last_error(log) if log is not None else ""
    return {"status": "fail", "reason": f"{what + ': ' if what else ''}{why}{' (' + err + ')' if err else ''}; "
                                        "see logs.txt"}


def _last_error(log: Path) -> str:
    """The last line of ``log`` that names an exception (``SomethingError: ...``), shortened."""
    for line in reversed(_read(log).splitlines()):
        m = re.search(r"\b([A-Z]\w*(Error|Exception))\b.*", line)
        if m:
            return m.group(0)[:200]
    return ""


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.is_file() else ""


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in _read(run_dir / "metrics.jsonl").splitlines() if x.strip()]
    return [r for r in rows if "split" not in r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU mode: tiny shapes, a few steps (also DEVICE=cpu)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_check"))
    p.add_argument("--work", default=None, help="scratch folder (default: outputs/gpu_check_work)")
    p.add_argument("--tokenizers", default="auto", help="auto, tiny, or a folder holding gpt2/gpt2-base and "
                   "qwen/Qwen1.5-1.8B (tokenizer files + config.json); see gpu_check_parts.py")
    p.add_argument("--parts", nargs="+", default=["env", "setup", "criteria", "train", "bench_mcw", "bench_step",
                                                  "bench_criteria", "bench_generation"])
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 470 on GPU, 175 small)")
    p.add_argument("--jobs", type=int, default=None, help="parts run at once in the concurrent phase")
    p.add_argument("--time-scale", type=float, default=float(os.environ.get("GPU_CHECK_TIME_SCALE", 1.0)),
                   help="multiply every time limit (a loaded CI machine; default 1, env GPU_CHECK_TIME_SCALE)")
    args = p.parse_args(argv)
    known = {"env", "setup", "criteria", "train", "bench_mcw", "bench_step", "bench_criteria", "bench_generation"}
    known |= {f"train:{c}:{e}" for c in TRAIN for e in ENGINES}
    bad = [x for x in args.parts if x not in known]
    if bad:
        p.error(f"--parts {' '.join(bad)}: unknown; choose from {', '.join(sorted(known))}")
    args.small = args.small or os.environ.get("DEVICE", "").lower() == "cpu"
    args.work = args.work or str(ROOT / "outputs" / "gpu_check_work")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
