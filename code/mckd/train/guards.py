"""What stops a training run early: divergence, non-finite values, and Ctrl-C / SIGTERM.

* :class:`DivergenceMonitor`: the step loss is compared with an exponential moving mean of the
  previous step losses (``m <- 0.9 m + 0.1 loss``, started at the first step). A step whose loss
  exceeds ``threshold * m`` is *far above*; ``patience`` far-above steps in a row stop the run
  (far-above losses are left out of the mean, so a run that keeps climbing keeps being far
  above). The defaults (10x, 3 steps) leave room for the loss spikes of the first steps and for
  noisy small batches; ``--divergence-threshold 0`` turns the check off. With on-policy batches
  the loop keeps one monitor for off-policy steps and one for on-policy steps (whose loss lacks
  the CE term, so it is far smaller); steps that mix both kinds of micro-batch are not checked.
* :class:`StopSignals`: the first SIGINT/SIGTERM asks the loop to save a resumable checkpoint
  after the current optimizer step and exit; a second one exits at once.
"""
from __future__ import annotations

import logging
import math
import signal
import threading

import torch

logger = logging.getLogger("mckd.train")

EMA_DECAY = 0.9


class TrainingAborted(RuntimeError):
    """The run stopped because it cannot go on usefully (non-finite steps, divergence); the
    message says which checkpoint holds the last good state."""


class TrainingDiverged(TrainingAborted):
    """Loss far above its running mean, non-finite dev metrics or non-finite weights."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the loop saved a resumable state (when a step had been taken) and stopped."""


class DivergenceMonitor:
    """Loss far above its moving mean for ``patience`` steps in a row (see the module docstring).

    Args:
        threshold: ratio to the moving mean that counts as far above (0: off).
        patience: consecutive far-above steps that stop the run.
    """

    def __init__(self, threshold: float, patience: int, mean: float | None = None, streak: int = 0,
                 suffix: str = ""):
        self.threshold, self.patience = threshold, patience
        self.mean, self.streak, self.suffix = mean, streak, suffix

    def update(self, loss: float) -> str | None:
        """Feed one step loss; returns a message when the run must stop."""
        if self.threshold <= 0 or not math.isfinite(loss):
            return None
        if self.mean is None or self.mean <= 0:
            self.mean = loss
            return None
        if loss > self.threshold * self.mean:
            self.streak += 1
            if self.streak >= self.patience:
                return (f"the loss diverged: {loss:.4g} is more than {self.threshold:g}x its moving "
                        f"mean {self.mean:.4g} for {self.streak} steps in a row "
                        "(--divergence-threshold, --divergence-patience)")
            return None
        self.streak = 0
        self.mean = EMA_DECAY * self.mean + (1 - EMA_DECAY) * loss
        return None

    def state(self) -> dict:
        return {f"loss_mean{self.suffix}": self.mean, f"far_streak{self.suffix}": self.streak}


class StepDivergence:
    """The loop's divergence check: one :class:`DivergenceMonitor` for off-policy steps and, when
    the run has on-policy batches, one for on-policy steps (their loss is the KD terms alone, far
    below a loss with the CE term). ``kind`` of a step: ``"off"``, ``"on"``, or ``"mixed"`` (some
    micro-batches of each; not checked).

    Args:
        threshold, patience: as :class:`DivergenceMonitor`.
        state: the trainer state (a resumed run continues its means and streaks).
        on_policy: whether the run has on-policy batches (adds the second monitor's state).
    """

    def __init__(self, threshold: float, patience: int, state: dict, on_policy: bool = False):
        self.on_policy = on_policy
        self.monitors = {
            "off": DivergenceMonitor(threshold, patience, state.get("loss_mean"), state.get("far_streak", 0)),
            "on": DivergenceMonitor(threshold, patience, state.get("loss_mean_on_policy"),
                                    state.get("far_streak_on_policy", 0), suffix="_on_policy"),
        }

    def update(self, loss: float, kind: str = "off") -> str | None:
        monitor = self.monitors.get(kind)
        return None if monitor is None else monitor.update(loss)

    def state(self) -> dict:
        out = self.monitors["off"].state()
        if self.on_policy:
            out.update(self.monitors["on"].state())
        return out


def all_finite(tensors) -> bool:
    """True when every tensor is finite (one host sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def non_finite_metrics(metrics: dict | None) -> list[str]:
    return [k for k, v in (metrics or {}).items() if isinstance(v, float) and not math.isfinite(v)]


class StopSignals:
    """Context manager: SIGINT/SIGTERM set :attr:`requested` (first) or raise KeyboardInterrupt
    (second). Installed only in the main thread; elsewhere it does nothing."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {name}")
        self.requested = name
        logger.warning("%s received: saving a resumable state after this step, then stopping "
                       "(send it again to stop at once)", name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
