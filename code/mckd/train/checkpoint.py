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

Safe loading: resume files are read with ``torch.load(weights_only=True)``, which accepts tensors
and plain containers only; the RNG state is stored as tensors and lists. DeepSpeed's own files are
read by DeepSpeed, so they are scanned first and refused when they reference any class outside
torch's safe set and the few DeepSpeed classes listed in :data:`DEEPSPEED_GLOBALS`.

Run state: ``<save-dir>/run_state.json`` says what the training run last did (``running``,
``finished`` - written at the very end -, ``diverged``, ``interrupted``, ``failed``);
:func:`run_state` turns it into what a driver script needs (empty, unfinished, finished,
diverged).
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mckd import dist
from mckd.train import rundir

logger = logging.getLogger(__name__)

# the checkpoint layout and the "best" ranking (torch-free, for the scripts): mckd.train.layout
from mckd.train.layout import (STATE_JSON, _NAME, best_checkpoint, best_rank_key, checkpoint_name,  # noqa: E402,F401
                               dev_metrics, find_checkpoints, latest_checkpoint, list_checkpoints)
RUN_STATE = "run_state.json"
# DeepSpeed classes its checkpoint files hold besides tensors and containers (ZeRO 0-3, bf16/fp16)
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that references objects other than tensors and plain containers."""


def rng_state() -> dict:
    """The RNG state of this process as tensors and plain containers (loadable with
    ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(internal), gauss],
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    n = st["numpy"]
    if isinstance(n, dict):
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    else:  # checkpoints written before the plain format: numpy's own tuple (allow-listed)
        np.random.set_state(n)
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _numpy_rng_globals() -> list:
    """What numpy's RNG state tuple (an uint32 array) needs to unpickle: array reconstruction and
    its dtype, nothing that can run other code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path: str | os.PathLike):
    """``torch.load`` that accepts tensors, plain containers and numpy's RNG arrays only.

    Raises:
        UnsafeCheckpointError: the file references any other object (it is never executed).
    """
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers "
            f"({first[:200]}); only load checkpoints from people you trust") from None


def check_deepspeed_files(directory: str | os.PathLike) -> None:
    """Scan DeepSpeed's checkpoint files (without unpickling them) before DeepSpeed loads them.

    Raises:
        UnsafeCheckpointError: a file references a class outside torch's safe set and
            :data:`DEEPSPEED_GLOBALS`, or uses pickle instructions torch's scanner refuses.
    """
    for f in sorted(Path(directory).rglob("*.pt")):
        try:
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise UnsafeCheckpointError(f"{f}: refused to load: {e}") from None
        bad = sorted(names - DEEPSPEED_GLOBALS)
        if bad:
            raise UnsafeCheckpointError(f"{f}: refused to load: it references {', '.join(bad[:5])}, "
                                        "which a DeepSpeed checkpoint does not need")


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
    try:
        _write_checkpoint(tmp, engine=engine, student=student, criterion=criterion, tokenizer=tokenizer,
                          trainer_state=trainer_state, only_save_projector=only_save_projector)
    except (OSError, RuntimeError) as e:
        err = rundir.no_space_error(e, tmp)
        if err is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise err from None
    dist.barrier()
    if dist.is_main():
        if final.exists():  # a resumed run that repeats a step it had saved before being killed
            shutil.rmtree(final)
        os.replace(tmp, final)
        for stale in save_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def checkpoint_bytes(*modules, optimizer_copies: int = 2) -> int:
    """A generous estimate of one checkpoint's size: the parameters and buffers of ``modules`` in
    fp32, plus ``optimizer_copies`` fp32 copies of the trainable ones (AdamW's two moments)."""
    total = 0
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            n = getattr(p, "ds_numel", p.numel())
            total += 4 * n * (1 + (optimizer_copies if p.requires_grad else 0))
        total += sum(4 * b.numel() for b in m.buffers())
    return total + (16 << 20)  # tokenizer files, json, RNG states


def _write_checkpoint(tmp: Path, *, engine, student, criterion, tokenizer, trainer_state: dict,
                      only_save_projector: bool) -> None:
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


def load_resume_state(ckpt: Path, *, engine, criterion) -> dict:
    """Restore optimizer/scheduler, criterion state and this rank's RNG from ``ckpt``.

    The student weights are loaded by the caller (from the checkpoint directory, in place of
    ``--model-path`` / ``--peft-path``) before the engine is built. Returns the trainer state.
    """
    state = json.loads((ckpt / STATE_JSON).read_text())
    rng_file = ckpt / "rng" / f"rank{dist.rank()}.pt"
    rng = safe_load(rng_file) if rng_file.is_file() else None  # every file is checked before use
    if engine.kind == "deepspeed":
        check_deepspeed_files(ckpt / "deepspeed")
        engine.load(str(ckpt))
    else:
        engine.load_state_dict(safe_load(ckpt / "trainer_state.pt"))
        criterion.load_state_dict(safe_load(ckpt / "criterion.pt"))
    if rng is not None:
        set_rng_state(rng)
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
        if v is None or not math.isfinite(float(v)):
            return -float("inf")
        return float(v) if higher_is_better else -float(v)

    # ties: the later checkpoint wins
    ranked = sorted(ckpts, key=lambda p: (score(p), ckpts.index(p)), reverse=True)
    keep = set(ranked[:keep_best_n]) | {latest}
    deleted = []
    for p in ckpts:
        if p in keep:
            continue
        if _remove_unless_read(p):
            deleted.append(p)
            logger.info("removed checkpoint %s (not among the %d best by %s)", p, keep_best_n, score_key)
        else:
            logger.info("kept checkpoint %s although not among the %d best: it is being evaluated",
                        p, keep_best_n)
    return deleted


def _remove_unless_read(p: Path) -> bool:
    """Remove checkpoint ``p`` unless a reader pinned it (:func:`mckd.train.rundir.pin_checkpoint`).
    The directory is renamed first, so a reader that pins it in between is seen and the rename is
    undone; a reader that arrives after the rename finds it gone and fails."""
    if rundir.live_readers(p):
        return False
    doomed = p.with_name(f".deleting-{p.name}")
    os.replace(p, doomed)
    if rundir.live_readers(doomed):
        os.replace(doomed, p)
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


# --------------------------------------------------------------------------- run state
@dataclass(frozen=True)
class RunState:
    """What a run directory holds.

    Attributes:
        status: ``empty`` (nothing of a run), ``unfinished`` (started, neither finished nor
            diverged: ``--resume`` continues it), ``finished`` (the run wrote its end),
            ``diverged`` (stopped by divergence or non-finite losses: retrain it).
        recorded: the status the run itself wrote last (``running``, ``finished``, ``diverged``,
            ``interrupted``, ``failed``), or None.
        step: the optimizer step it recorded.
        message: why it stopped, when it said.
    """

    status: str
    recorded: str | None = None
    step: int | None = None
    message: str | None = None


def write_run_state(save_dir: str | os.PathLike, status: str, *, step: int, message: str | None = None) -> None:
    """Record the run's status atomically (rank 0 only)."""
    if not dist.is_main():
        return
    path = Path(save_dir) / RUN_STATE
    tmp = path.with_name(f".{RUN_STATE}.tmp")
    tmp.write_text(json.dumps({"status": status, "step": step, "message": message,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    os.replace(tmp, path)


def run_state(save_dir: str | os.PathLike) -> RunState:
    """The state of a run directory: empty, unfinished, finished or diverged.

    ``finished`` only when the training run recorded its end in ``run_state.json`` (written after
    the last checkpoint); an interrupted, killed or failed run is ``unfinished`` whatever
    checkpoints it left; a run stopped by divergence or non-finite losses is ``diverged``.
    """
    entries = rundir.run_entries(save_dir)
    if not entries:
        return RunState("empty")
    try:
        rec = json.loads((Path(save_dir) / RUN_STATE).read_text())
    except (OSError, ValueError):
        rec = {}
    recorded = rec.get("status")
    status = recorded if recorded in ("finished", "diverged") else "unfinished"
    return RunState(status, recorded, rec.get("step"), rec.get("message"))
