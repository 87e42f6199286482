"""Checkpoint layout and the "best checkpoint" ranking, without torch (the scripts' helpers import
it in a fraction of a second).

A run directory holds checkpoints ``epoch<E>_step<S>/``; one is complete once it has its
``trainer_state.json`` (written last, then the directory is renamed into place). "Best": the
highest dev ROUGE-L in that file; without ROUGE-L the lowest dev loss; without either the most
recently modified run, then the highest step; a checkpoint whose dev metrics are not finite is
never chosen. :mod:`mckd.train.checkpoint` re-exports these names.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

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


def find_checkpoints(roots: list[str | os.PathLike]) -> list[Path]:
    """Complete checkpoints anywhere below the given directories (a run root with several
    settings below it works); missing directories are skipped."""
    found = []
    for root in roots:
        r = Path(root)
        if not r.is_dir():
            continue
        for state in r.rglob(STATE_JSON):
            if _NAME.match(state.parent.name):
                found.append(state.parent)
    return found


def dev_metrics(ckpt: str | os.PathLike) -> dict:
    """The dev metrics a checkpoint's trainer_state.json recorded ({} when none or unreadable)."""
    try:
        return json.loads((Path(ckpt) / STATE_JSON).read_text()).get("dev", {}) or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _finite_dev(ckpt: Path) -> bool:
    return all(math.isfinite(v) for v in dev_metrics(ckpt).values() if isinstance(v, (int, float)))


def best_rank_key(ckpt: Path) -> tuple:
    """Sort key of "best": the highest dev ROUGE-L; without ROUGE-L the lowest dev loss; without
    either the most recently modified run, then the highest step."""
    dev = dev_metrics(ckpt)
    rouge, loss = dev.get("rougeL"), dev.get("loss")
    step = int(_NAME.match(ckpt.name).group(2))
    return (rouge is not None, rouge if rouge is not None else 0.0,
            loss is not None, -loss if loss is not None else 0.0,
            ckpt.parent.stat().st_mtime, step)


def best_checkpoint(roots: list[str | os.PathLike]) -> Path | None:
    """The best complete checkpoint below ``roots`` (:func:`best_rank_key`); one whose dev
    metrics are not finite is never returned. None when there is none."""
    found = [c for c in find_checkpoints(roots) if _finite_dev(c)]
    return max(found, key=best_rank_key) if found else None
