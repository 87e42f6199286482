"""The evaluation run: for every (dataset, seed) pair generate, score and write the files.

Layout (nothing of the training run is touched)::

    <out_dir>/                       default <ckpt>/eval (greedy: <ckpt>/eval-greedy)
      <dataset>/seed<k>/predictions.jsonl   one line per example, input order
      <dataset>/seed<k>/metrics.json        scores + the settings that produced them
      results.json, results.md              aggregate (mean/std over seeds, average over datasets)

A pair whose ``metrics.json`` exists with the same settings is skipped (``overwrite`` redoes it);
one with different settings is an error rather than a silent mix of protocols.

Several processes (torchrun) split the *batches* of one global, length-sorted plan, so every
example is generated exactly once, and each batch has the same content and seed whatever the
number of processes. Each rank scores its own examples; rank 0 gathers, checks that every index
arrived exactly once, and writes.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mckd.data.prompts import build_prompt_dataset
from mckd.dist import DistContext
from mckd.evaluation.generate import batch_seed, generate_one_batch, generation_kwargs, plan_batches
from mckd.evaluation.loading import CheckpointError
from mckd.evaluation.metrics import exact_match, rouge_l, token_nll
from mckd.options import opt

logger = logging.getLogger(__name__)

# Published data-file names used the scripts' model-type strings, not config.model_type.
_FAMILY_ALIASES = {"qwen2": "qwen", "gpt_neox": "gptneox"}
DEFAULT_DATASETS = ("dolly", "self-inst", "vicuna", "sinst/11_", "dialogsum")
DEFAULT_SEEDS = (10, 20, 30, 40, 50)


class EvalSetupError(RuntimeError):
    """A run that cannot start (missing data file, finished pairs with other settings)."""


class _DatasetLimit(argparse.Action):
    """``--dataset-limit DATASET=N`` (repeatable) into a ``{dataset: N}`` dict."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), value[0]: value[1]})


def _limit_pair(text: str) -> tuple[str, int]:
    name, sep, num = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--dataset-limit {text!r}: expected DATASET=N, e.g. uinst/11_=10000")
    try:
        return name, int(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dataset-limit {text!r}: N must be an integer") from None


@dataclass
class EvalConfig:
    """Everything one evaluation run needs: the fields are the flags of ``code/evaluate.py run``."""

    ckpt: str | None = opt(None, "checkpoint directory: full HF model or LoRA adapter", required=True)
    data_dir: str | None = opt(None, "folder holding <dataset>/valid.jsonl (evaluate.py: <repo>/data)")
    datasets: list[str] = opt(list(DEFAULT_DATASETS), "datasets to evaluate", nargs="+")
    seeds: list[int] = opt(list(DEFAULT_SEEDS), "sampling seeds (one pair per dataset and seed)",
                           type=int, nargs="+")
    base_model_path: str | None = opt(None, "base model of a LoRA adapter (default: $MODEL_PATH, "
                                            "then adapter_config.json)")
    out_dir: str | None = opt(None, "default <ckpt>/eval (greedy: <ckpt>/eval-greedy)")
    batch_size: int = opt(32, "prompts per generate() call and process", flag="--eval-batch-size")
    max_prompt_length: int = opt(256, "")
    max_new_tokens: int = opt(256, "")
    greedy: bool = opt(False, "greedy decoding (one pair per dataset)", action="store_true")
    top_p: float = opt(1.0, "")
    top_k: int = opt(0, "")
    temperature: float = opt(1.0, "")
    no_repeat_ngram_size: int = opt(6, "")
    limit: int = opt(-1, "evaluate the first N examples of each set (-1: all)", flag="--dev-num")
    limits: dict[str, int] = opt({}, "per-dataset cap DATASET=N (the published scripts cap "
                                     "uinst/11_ at 10000)", flag="--dataset-limit",
                                 action=_DatasetLimit, type=_limit_pair)
    lm_loss: bool = opt(True, "skip the teacher-forced loss on the reference", flag="--no-lm-loss",
                        action="store_false")
    overwrite: bool = opt(False, "redo pairs that are already finished", action="store_true")
    dtype: str = opt("auto", "auto (fp32 on CPU, bf16/fp16 on GPU), fp32, bf16, fp16",
                     choices=("auto", "fp32", "bf16", "fp16"))

    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path(self.ckpt) / ("eval-greedy" if self.greedy else "eval")

    def run_seeds(self) -> list[int]:
        """Greedy decoding does not depend on the seed: one pair per dataset is enough."""
        return list(self.seeds[:1]) if self.greedy else list(self.seeds)

    def decoding(self) -> dict:
        d = {"do_sample": not self.greedy, "max_new_tokens": self.max_new_tokens,
             "no_repeat_ngram_size": self.no_repeat_ngram_size}
        if not self.greedy:
            d.update(top_p=self.top_p, top_k=self.top_k, temperature=self.temperature)
        return d


@dataclass
class PromptSet:
    """A dataset ready for generation: ``N`` prompts with their references."""

    name: str
    path: Path
    prompt_ids: list[list[int]]
    references: list[tuple[str, ...]]


def resolve_data_file(data_dir: str | os.PathLike, dataset: str, model_type: str) -> Path:
    """``<data_dir>/<dataset>/valid_<family>.jsonl`` if present, else ``valid.jsonl``."""
    d = Path(data_dir) / dataset
    names = [f"valid_{model_type}.jsonl"]
    if model_type in _FAMILY_ALIASES:
        names.append(f"valid_{_FAMILY_ALIASES[model_type]}.jsonl")
    names.append("valid.jsonl")
    for n in names:
        if (d / n).is_file():
            return d / n
    raise FileNotFoundError(f"dataset {dataset!r}: none of {names} in {d} (check --data-dir / DATA_DIR)")


def load_prompt_set(path: Path, name: str, tokenizer, max_prompt_length: int, limit: int = -1) -> PromptSet:
    """Read the jsonl and tokenize prompts (tail-keeping truncation, see ``encode_prompt``)."""
    rows = build_prompt_dataset(path, tokenizer, max_prompt_length=max_prompt_length, limit=limit)
    return PromptSet(name=name, path=path, prompt_ids=[r["prompt_ids"] for r in rows],
                     references=[tuple(r["references"]) for r in rows])


def teacher_forced_loss(model, prompt_ids: list[list[int]], answer_ids: list[list[int]], *, pad_id: int,
                        device: torch.device, chunk: int = 8) -> list[float]:
    """Per-example mean cross-entropy of the reference answer given the prompt.

    Prompts are left-padded to a common width ``P`` and answers right-padded to ``A``, so every
    answer starts at position ``P`` and only the last ``A + 1`` logits are needed
    (``logits_to_keep``): the (b, T, V) logits of the prompt are never materialised. Position ids
    count real tokens only. Logits are upcast to fp32 ``chunk`` examples at a time.

    Returns:
        One loss per example (``nan`` when the answer is empty).
    """
    out: list[float] = []
    for s in range(0, len(prompt_ids), chunk):
        ps, ans = prompt_ids[s:s + chunk], answer_ids[s:s + chunk]
        P, A = max(len(p) for p in ps), max(max(len(a) for a in ans), 1)
        ids = torch.full((len(ps), P + A), pad_id, dtype=torch.long)  # (b, T), T = P + A
        mask = torch.zeros_like(ids)
        labels = torch.full((len(ps), A), -100, dtype=torch.long)  # (b, A)
        for r, (p, a) in enumerate(zip(ps, ans)):
            ids[r, P - len(p):P + len(a)] = torch.as_tensor(p + a, dtype=torch.long)
            mask[r, P - len(p):P + len(a)] = 1
            labels[r, :len(a)] = torch.as_tensor(a, dtype=torch.long)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        ids, mask, pos, labels = ids.to(device), mask.to(device), pos.to(device), labels.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=A + 1).logits
        tok = token_nll(logits[:, :A], labels)  # (b, A): position P-1+j predicts answer token j
        n = (labels != -100).sum(1)
        per = tok.sum(1) / n.clamp_min(1)
        out.extend(torch.where(n > 0, per, torch.full_like(per, math.nan)).tolist())
    return out


def _answer_ids(tokenizer, ref: str, budget: int) -> list[int]:
    ids = tokenizer.encode(ref, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids[:max(budget, 0)]


def _generate_and_score(model, tokenizer, ps: PromptSet, cfg: EvalConfig, seed: int, ctx: DistContext) -> list[dict]:
    """This rank's share of one pair: a list of per-example records (index, prediction, scores)."""
    pad_id = tokenizer.pad_token_id
    kw = generation_kwargs(eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                           top_p=cfg.top_p, top_k=cfg.top_k, temperature=cfg.temperature,
                           do_sample=not cfg.greedy, max_new_tokens=cfg.max_new_tokens,
                           no_repeat_ngram_size=cfg.no_repeat_ngram_size)
    plan = plan_batches([len(p) for p in ps.prompt_ids], cfg.batch_size)
    records: list[dict] = []
    for b in range(ctx.rank, len(plan), ctx.world_size):
        idx = plan[b]
        prompts = [ps.prompt_ids[i] for i in idx]
        new = generate_one_batch(model, prompts, pad_id=pad_id, stop_ids=[tokenizer.eos_token_id], gen_kwargs=kw,
                                 seed=None if cfg.greedy else batch_seed(seed, b))
        if cfg.lm_loss:
            budget = cfg.max_prompt_length + cfg.max_new_tokens
            answers = [_answer_ids(tokenizer, ps.references[i][0], budget - len(p)) for i, p in zip(idx, prompts)]
            losses = teacher_forced_loss(model, prompts, answers, pad_id=pad_id, device=ctx.device)
        else:
            losses = [None] * len(idx)
        for i, ids, loss in zip(idx, new, losses):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            refs = ps.references[i]
            records.append({"index": i, "prediction": text, "references": list(refs), "gen_len": len(ids),
                            "rougeL": rouge_l(text, refs), "exact_match": exact_match(text, refs),
                            "lm_loss": loss})
    return records


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def summarize(records: list[dict]) -> dict:
    """Corpus metrics from per-example records: mean x 100 rounded to 4 decimals."""
    n = len(records)
    if n == 0:
        return {"rougeL": 0.0, "exact_match": 0.0, "avg_gen_len": 0.0, "n": 0}
    losses = [r["lm_loss"] for r in records if r.get("lm_loss") is not None and not math.isnan(r["lm_loss"])]
    out = {"rougeL": round(100 * sum(r["rougeL"] for r in records) / n, 4),
           "exact_match": round(100 * sum(r["exact_match"] for r in records) / n, 4),
           "avg_gen_len": round(sum(r["gen_len"] for r in records) / n, 4), "n": n}
    if losses:
        out["lm_loss"] = round(sum(losses) / len(losses), 6)
    return out


def pair_dir(out_dir: Path, dataset: str, seed: int) -> Path:
    return out_dir / dataset / f"seed{seed}"


def pair_status(pdir: Path, settings: dict) -> str:
    """``todo``, ``done`` (same settings) or ``conflict`` (finished with other settings)."""
    mfile = pdir / "metrics.json"
    if not mfile.is_file():
        return "todo"
    try:
        old = json.loads(mfile.read_text()).get("settings")
    except json.JSONDecodeError:
        return "todo"
    if old == settings:
        return "done"
    # the same data under another path (another checkout, a moved or deleted one) is the same pair:
    # compared by the recorded sha256, or by the files' bytes for records without one
    rest = {k for k in set(old or {}) | set(settings) if k not in ("data_file", "data_sha256")}
    if not old or any(old.get(k) != settings.get(k) for k in rest):
        return "conflict"
    if old.get("data_sha256") and settings.get("data_sha256"):
        return "done" if old["data_sha256"] == settings["data_sha256"] else "conflict"
    return "done" if _same_content(old.get("data_file"), settings.get("data_file")) else "conflict"


def _same_content(a: str | None, b: str | None) -> bool:
    """Whether two data files hold the same bytes (False when either is missing)."""
    if not a or not b or not Path(a).is_file() or not Path(b).is_file():
        return False
    return filecmp.cmp(a, b, shallow=False)


def evaluate_pair(model, tokenizer, ps: PromptSet, cfg: EvalConfig, seed: int, ctx: DistContext,
                  settings: dict) -> dict | None:
    """Generate, score and (rank 0) write one (dataset, seed) pair. Returns metrics on rank 0."""
    t0 = time.perf_counter()
    mine = _generate_and_score(model, tokenizer, ps, cfg, seed, ctx)
    gathered = ctx.gather_to_main(mine)
    elapsed = time.perf_counter() - t0
    metrics = None
    if ctx.is_main:
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
        got = [r["index"] for r in records]
        if got != list(range(len(ps.prompt_ids))):
            raise RuntimeError(f"{ps.name} seed {seed}: gathered indices are not 0..{len(ps.prompt_ids) - 1} "
                               f"exactly once ({len(got)} records)")
        metrics = {"dataset": ps.name, "seed": seed, **summarize(records),
                   "time_s": round(elapsed, 3), "examples_per_s": round(len(records) / max(elapsed, 1e-9), 4),
                   "world_size": ctx.world_size, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
                   "settings": settings}
        pdir = pair_dir(cfg.resolved_out_dir(), ps.name, seed)
        pdir.mkdir(parents=True, exist_ok=True)
        tmp = pdir / "predictions.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, pdir / "predictions.jsonl")
        _write_json_atomic(pdir / "metrics.json", metrics)  # written last: marks the pair finished
        logger.info("%s | seed %d | rougeL %.4f | EM %.4f | avg gen len %.2f | lm_loss %s | %d examples in %.1fs",
                    ps.name, seed, metrics["rougeL"], metrics["exact_match"], metrics["avg_gen_len"],
                    metrics.get("lm_loss", "-"), metrics["n"], elapsed)
    ctx.barrier()
    return metrics


def pair_settings(cfg: EvalConfig, info, data_file: Path, limit: int) -> dict:
    """The protocol of a pair; stored in metrics.json and compared before skipping. Batch size and
    dtype are recorded in metrics.json too but not compared: they change individual samples, not
    the protocol, so a run may be resumed with another batch size."""
    return {"checkpoint": str(Path(info.path).resolve()), "lora": info.is_lora,
            "base_model": str(Path(info.model_dir).resolve()) if info.is_lora else None,
            "model_type": info.model_type, "data_file": str(data_file.resolve()),
            "data_sha256": hashlib.sha256(Path(data_file).read_bytes()).hexdigest(), "limit": limit,
            "max_prompt_length": cfg.max_prompt_length, **cfg.decoding()}


def _plan_jobs(cfg: EvalConfig, info, out_dir: Path) -> tuple[list, str | None]:
    """The pairs still to run as ``(dataset, data_file, limit, seed, settings)``, or an error text."""
    jobs = []
    try:
        for ds in cfg.datasets:
            data_file = resolve_data_file(cfg.data_dir, ds, info.model_type)
            caps = [c for c in (cfg.limit, cfg.limits.get(ds, -1)) if c >= 0]
            limit = min(caps) if caps else -1
            for seed in cfg.run_seeds():
                settings = pair_settings(cfg, info, data_file, limit)
                status = "todo" if cfg.overwrite else pair_status(pair_dir(out_dir, ds, seed), settings)
                if status == "conflict":
                    return [], (f"{pair_dir(out_dir, ds, seed)}/metrics.json was produced with other settings; "
                                "pass --overwrite or choose another --out-dir")
                if status == "todo":
                    jobs.append((ds, data_file, limit, seed, settings))
                else:
                    logger.info("%s seed %d: finished earlier, skipped (--overwrite redoes it)", ds, seed)
    except (FileNotFoundError, ValueError) as e:
        return [], str(e)
    return jobs, None


def run_evaluation(cfg: EvalConfig, ctx: DistContext) -> dict | None:
    """Evaluate every (dataset, seed) pair of ``cfg`` and write the aggregate. Returns it on rank 0.

    The checkpoint is pinned meanwhile (:func:`mckd.train.rundir.pin_checkpoint`): a training run
    that prunes checkpoints leaves it alone, and a checkpoint that disappears anyway is an error
    (never a partial table)."""
    import contextlib

    from mckd.evaluation.loading import resolve_checkpoint
    from mckd.train.rundir import RunDirError, pin_checkpoint

    info = resolve_checkpoint(cfg.ckpt, cfg.base_model_path)
    out_dir = cfg.resolved_out_dir()
    # Rank 0 decides what to run and tells the others, so every rank runs the same pairs (and an
    # error is raised on every rank instead of leaving the others waiting in a collective).
    plan = _plan_jobs(cfg, info, out_dir) if ctx.is_main else None
    jobs, error = ctx.broadcast_from_main(plan)
    if error:
        raise EvalSetupError(error)
    pin = pin_checkpoint(cfg.ckpt) if ctx.is_main else contextlib.nullcontext()
    try:
        with pin:
            return _run_evaluation(cfg, ctx, info, out_dir, jobs)
    except RunDirError as e:
        raise CheckpointError(str(e)) from None


def _run_evaluation(cfg: EvalConfig, ctx: DistContext, info, out_dir: Path, jobs: list) -> dict | None:
    from mckd.evaluation.loading import load_for_eval, pick_dtype
    from mckd.evaluation.results import write_results
    if jobs:
        model, tokenizer = load_for_eval(info, device=ctx.device, dtype=pick_dtype(cfg.dtype, ctx.device))
        cache: dict[str, PromptSet] = {}
        for ds, data_file, limit, seed, settings in jobs:
            if ds not in cache:
                cache = {ds: load_prompt_set(data_file, ds, tokenizer, cfg.max_prompt_length, limit)}
            evaluate_pair(model, tokenizer, cache[ds], cfg, seed, ctx, settings)
    if ctx.is_main:
        dumped = asdict(cfg)
        return write_results(out_dir, run_config=dumped)
    return None
