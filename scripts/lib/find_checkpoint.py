#!/usr/bin/env python
"""Print the best complete checkpoint under one or more run directories (used by the scripts).

Usage::

    python scripts/lib/find_checkpoint.py <dir> [<dir> ...]

A checkpoint is a directory named ``epoch{E}_step{S}`` holding ``trainer_state.json`` (the layout
of ``code/distillation.py``); the directories are searched recursively, so a run root such as
``outputs/qwen/Qwen1.5-1.8B/sft`` (several settings below it) works. The best one has the highest
dev ROUGE-L in its ``trainer_state.json``; without ROUGE-L the lowest dev loss; without either the
highest step of the most recently modified run. A checkpoint whose dev metrics are not finite
(NaN, inf) is never returned. Exit status 1 and nothing on stdout when there is none. Standard
library only, so it runs before any environment is activated.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

_NAME = re.compile(r"^epoch(\d+)_step(\d+)$")


def checkpoints(roots: list[str]) -> list[Path]:
    found = []
    for root in roots:
        r = Path(root)
        if not r.is_dir():
            continue
        for state in r.rglob("trainer_state.json"):
            if _NAME.match(state.parent.name) and not state.parent.name.startswith(".tmp"):
                found.append(state.parent)
    return found


def dev_metrics(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "trainer_state.json").read_text()).get("dev", {}) or {}
    except (OSError, ValueError, AttributeError):
        return {}


def finite(ckpt: Path) -> bool:
    return all(math.isfinite(v) for v in dev_metrics(ckpt).values() if isinstance(v, (int, float)))


def rank_key(ckpt: Path) -> tuple:
    dev = dev_metrics(ckpt)
    rouge = dev.get("rougeL")
    loss = dev.get("loss")
    step = int(_NAME.match(ckpt.name).group(2))
    return (rouge is not None, rouge if rouge is not None else 0.0,
            loss is not None, -loss if loss is not None else 0.0,
            ckpt.parent.stat().st_mtime, step)


def best_checkpoint(roots: list[str]) -> Path | None:
    found = [c for c in checkpoints(roots) if finite(c)]
    return max(found, key=rank_key) if found else None


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    best = best_checkpoint(argv)
    if best is None:
        return 1
    print(best)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
