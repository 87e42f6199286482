"""Checkpoints in the published layout, written atomically, and the keep-best-N policy.

``<save-dir>/epoch{E}_step{S}/`` holds:

* the student in Hugging Face format (``save_pretrained``, safetensors) or, with LoRA, the adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``), plus the tokenizer files;
* ``criterion.pt``: the criterion's full state (projectors, heads, buffers such as MCW-KD cost
  weights) and ``projector.pt`` (the same tensors, for tools that expect the published name);
* resume state: ``trainer_state.json`` (step, epoch, data position, dev metrics; readable),
  ``trainer_state.pt`` (optimizer, scheduler, grad scaler for the torch engine), ``rng/rank{r}.pt``
  (python, numpy, torch, cuda RNG of every rank) and, under DeepSpeed, ``deepspeed/`` (its own
  per-rank optimizer partitions).

Atomicity: everything is written into ``<save-dir>/.tmp-epoch{E}_step{S}`` and renamed when all
ranks are done, so a kill mid-write never leaves a complete-looking checkpoint; stale ``.tmp-*``
directories are ignored (and removed at the next save).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mckd import dist

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^epoch(\d+)_step(\d+)$")
STATE_JSON = "trainer_state.json"


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch{epoch}_step{step}"


def list_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed, with trainer_state.json), oldest step first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    out = []
    for p in save_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_JSON).is_file():
            out.append((int(m.group(2)), p))
    return [p for _, p in sorted(out)]


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(save_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(save_dir: str | os.PathLike, name: str, *, engine, student, criterion, tokenizer,
                    trainer_state: dict, only_save_projector: bool = False) -> Path:
    """Write one checkpoint atomically (every rank must call: DeepSpeed saves are collective).

    Args:
        save_dir: the run directory.
        name: ``epoch{E}_step{S}``.
        engine: TorchEngine or DeepSpeedEngine.
        student: the (unwrapped, possibly PEFT) student model.
        criterion: the criterion module.
        tokenizer: student tokenizer.
        trainer_state: JSON-serialisable loop state (step, epoch, data position, metrics, best list).
        only_save_projector: skip the student weights (projector pre-training).

    Returns:
        The final checkpoint path.
    """
    save_dir = Path(save_dir)
    final, tmp = save_dir / name, save_dir / f".tmp-{name}"
    if dist.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    torch.save(rng_state(), tmp / "rng" / f"rank{dist.rank()}.pt")
    student_sd = None
    crit_sd = None
    if engine.kind == "deepspeed":
        engine.save(str(tmp))
        if engine.zero_stage == 3:  # gather the partitioned weights (collective)
            full = engine.engine._zero3_consolidated_16bit_state_dict()
            if full is not None:
                student_sd = {k[8:]: v for k, v in full.items() if k.startswith("student.")}
                crit_sd = {k[10:]: v for k, v in full.items() if k.startswith("criterion.")}
    if dist.is_main():
        if crit_sd is None:
            crit_sd = {k: v.detach().cpu() for k, v in criterion.state_dict().items()}
        torch.save(crit_sd, tmp / "criterion.pt")
        torch.save(crit_sd, tmp / "projector.pt")
        if not only_save_projector:
            kw = {"state_dict": student_sd} if student_sd is not None else {}
            student.save_pretrained(tmp, safe_serialization=True, **kw)
        tokenizer.save_pretrained(tmp)
        if engine.kind == "torch":
            torch.save(engine.state_dict(), tmp / "trainer_state.pt")
        (tmp / STATE_JSON).write_text(json.dumps(trainer_state, indent=2, default=float) + "\n")
    dist.barrier()
    if dist.is_main():
        if final.exists():  # only with --overwrite (the loop refuses otherwise)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for stale in save_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def load_resume_state(ckpt: Path, *, engine, criterion) -> dict:
    """Restore optimizer/scheduler, criterion state and this rank's RNG from ``ckpt``.

    The student weights are loaded by the caller (from the checkpoint directory, in place of
    ``--model-path`` / ``--peft-path``) before the engine is built. Returns the trainer state.
    """
    state = json.loads((ckpt / STATE_JSON).read_text())
    if engine.kind == "deepspeed":
        engine.load(str(ckpt))
    else:
        engine.load_state_dict(torch.load(ckpt / "trainer_state.pt", map_location="cpu",
                                          weights_only=False))
        crit = torch.load(ckpt / "criterion.pt", map_location="cpu", weights_only=False)
        criterion.load_state_dict(crit)
    rng_file = ckpt / "rng" / f"rank{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    else:
        logger.warning("%s has no RNG state for rank %d (different world size?); continuing "
                       "with the seeded RNG", ckpt, dist.rank())
    return state


def prune_checkpoints(save_dir: str | os.PathLike, keep_best_n: int, *, higher_is_better: bool,
                      score_key: str) -> list[Path]:
    """Keep the ``keep_best_n`` best checkpoints by ``score_key`` in their trainer_state.json
    (``higher_is_better`` for ROUGE-L, lower for loss) plus the latest one (needed by --resume);
    checkpoints without a score count as the worst. Rank 0 only. Returns the deleted paths."""
    if not dist.is_main():
        return []
    ckpts = list_checkpoints(save_dir)
    if len(ckpts) <= keep_best_n:
        return []
    latest = ckpts[-1]

    def score(p: Path) -> float:
        v = json.loads((p / STATE_JSON).read_text()).get("dev", {}).get(score_key)
        if v is None:
            return -float("inf")
        return float(v) if higher_is_better else -float(v)

    # ties: the later checkpoint wins
    ranked = sorted(ckpts, key=lambda p: (score(p), ckpts.index(p)), reverse=True)
    keep = set(ranked[:keep_best_n]) | {latest}
    deleted = [p for p in ckpts if p not in keep]
    for p in deleted:
        shutil.rmtree(p, ignore_errors=True)
        logger.info("removed checkpoint %s (not among the %d best by %s)", p, keep_best_n, score_key)
    return deleted
