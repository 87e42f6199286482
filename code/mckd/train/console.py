"""What a training run shows a person: a progress bar over optimizer steps and one short line per
log interval. Every metric still goes to ``metrics.jsonl`` and TensorBoard (:mod:`mckd.train.loop`);
the console carries only what tells whether a run goes well and when it will end.

* The bar (tqdm, on stderr) counts optimizer steps and shows the last step's loss, the student's
  cross-entropy and tokens/s of the last log interval, the learning rate, and tqdm's own elapsed
  time and ETA. It is drawn only on rank 0 and only when stderr is a terminal, so log files and
  non-interactive jobs never receive its redraws; while it is drawn, console log records go through
  ``tqdm.write`` so that they do not break it.
* One line per log interval, through the ``mckd.train`` logger (console and ``train.log``)::

      train | step 150/1200 | epoch 0.62 | loss 2.3412 | ce 2.1034 | kd 0.2378 | acc 0.512 | lr 4.98e-04 | grad 1.23 | 5,230 tok/s | eta 3m12s

  ``ce`` is the student's cross-entropy on the labels (``nll_loss``), ``kd`` the distillation term
  and ``acc`` the token accuracy, each shown when the criterion reports it; ``grad`` is the gradient
  norm before clipping; the ETA extrapolates the wall time per step of this process so far
  (dev evaluations and checkpoints included).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time

__all__ = ["Progress", "format_duration", "summary_line"]

# (metrics.jsonl key, label, format) of the optional fields of the summary line, in order
_FIELDS = (("loss", "loss", ".4f"), ("nll_loss", "ce", ".4f"), ("kd_loss", "kd", ".4f"),
           ("accuracy", "acc", ".3f"), ("lr", "lr", ".2e"), ("grad_norm", "grad", ".3g"))


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m12s``, ``2h05m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def summary_line(rec: dict, *, total_steps: int, eta_s: float | None = None) -> str:
    """The console line of one log interval.

    Args:
        rec: the interval's record as written to ``metrics.jsonl`` (``step``, ``epoch``, ``loss``,
            ``lr``, ``tokens_per_s``, ... ; fields a criterion does not report are left out).
        total_steps: optimizer steps of the whole run.
        eta_s: seconds left, or None when not yet known.
    """
    parts = [f"step {rec['step']}/{total_steps}"]
    if "epoch" in rec:
        parts.append(f"epoch {rec['epoch']:.2f}")
    for key, label, fmt in _FIELDS:
        if key in rec and isinstance(rec[key], (int, float)):
            parts.append(f"{label} {rec[key]:{fmt}}")
    if "tokens_per_s" in rec:
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    parts.append(f"eta {format_duration(eta_s)}")
    return "train | " + " | ".join(parts)


class Progress:
    """The console of one training run: a tqdm bar over optimizer steps (rank 0, terminal only) and
    the ETA of the summary line.

    Args:
        total: optimizer steps of the run.
        initial: steps already done (a resumed run).
        enabled: False off rank 0: no bar at all.
        file: the bar's stream (stderr); the bar is drawn only when it is a terminal.
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, file=None):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        class _Bar(tqdm):
            monitor_interval = 0  # no monitor thread: nothing of tqdm runs between two steps

        self.total, self.initial = total, initial
        self._t0 = time.time()
        file = sys.stderr if file is None else file
        # disable=None: tqdm turns itself off when ``file`` is not a terminal
        self.bar = _Bar(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        file=file, disable=None if enabled else True)
        self._redirect = contextlib.ExitStack()
        if not self.bar.disable:  # console log records go through tqdm.write while the bar is drawn
            self._redirect.enter_context(logging_redirect_tqdm(
                loggers=[logging.getLogger()], tqdm_class=_Bar))
        self._postfix: dict[str, str] = {}

    @property
    def active(self) -> bool:
        """Whether the bar is drawn."""
        return not self.bar.disable

    def step(self, loss: float, lr: float) -> None:
        """One optimizer step taken, with its global mean loss and learning rate."""
        self._postfix.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.bar.set_postfix(self._postfix, refresh=False)
        self.bar.update(1)

    def eta(self, step: int) -> float | None:
        """Seconds left at ``step``, from the mean wall time per step of this process so far."""
        done = step - self.initial
        if done <= 0:
            return None
        return (time.time() - self._t0) / done * max(0, self.total - step)

    def log(self, rec: dict) -> str:
        """The summary line of an interval's record; the bar takes its CE and tokens/s."""
        if "nll_loss" in rec:
            self._postfix["ce"] = f"{rec['nll_loss']:.4f}"
        if "tokens_per_s" in rec:
            self._postfix["tok/s"] = f"{rec['tokens_per_s']:,.0f}"
        self.bar.set_postfix(self._postfix, refresh=False)
        return summary_line(rec, total_steps=self.total, eta_s=self.eta(rec["step"]))

    def close(self) -> None:
        self.bar.close()
        self._redirect.close()
