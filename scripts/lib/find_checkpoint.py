#!/usr/bin/env python
"""Print the best complete checkpoint under one or more run directories (used by the scripts).

Usage::

    python scripts/lib/find_checkpoint.py <dir> [<dir> ...]

The directories are searched recursively for checkpoints of ``code/distillation.py``; the best
one is :func:`mckd.train.layout.best_checkpoint`'s: the highest dev ROUGE-L in its
``trainer_state.json``, without ROUGE-L the lowest dev loss, without either the highest step of
the most recently modified run; one whose dev metrics are not finite is never returned. Exit
status 1 and nothing on stdout when there is none.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "code"))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    from mckd.train.layout import best_checkpoint

    best = best_checkpoint(argv)
    if best is None:
        return 1
    print(best)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
