"""How every command-line tool of the project reports errors (the two entry points, the
vocabulary-map builder, data preparation, the run-directory helper).

* A user error (bad flag or value, missing or malformed file, busy or unwritable run directory,
  unsafe checkpoint) prints ``<prog>: error: <message>`` - one or two lines naming the flag, file
  or line - and exits with status 2. ``--debug`` anywhere on the command line, or
  ``MCKD_DEBUG=1``, prints the traceback too.
* A training run that stops by itself (divergence, non-finite steps) exits with status 1 and its
  one-line reason; Ctrl-C or SIGTERM exit with status 130 (the training loop saves a resumable
  state first).
* Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Sequence


class UsageError(ValueError):
    """A bad command line (raised by :class:`ArgumentParser` instead of printing the usage)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line) instead of printing the whole usage."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def user_errors() -> tuple[type, ...]:
    """Exception classes that mean "the input is wrong", not "the program is wrong"."""
    from mckd.config import ConfigError
    from mckd.data.examples import DataFormatError
    from mckd.evaluation.loading import CheckpointError
    from mckd.evaluation.runner import EvalSetupError
    from mckd.models.loading import ModelLoadError
    from mckd.models.tokenizers import TokenizerLoadError
    from mckd.train.checkpoint import UnsafeCheckpointError
    from mckd.train.rundir import RunDirError

    return (UsageError, ConfigError, DataFormatError, CheckpointError, EvalSetupError, ModelLoadError,
            TokenizerLoadError, UnsafeCheckpointError, RunDirError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError, json.JSONDecodeError)


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(traceback wanted, argv without ``--debug``)."""
    debug = "--debug" in argv or os.environ.get("MCKD_DEBUG", "") not in ("", "0")
    return debug, [a for a in argv if a != "--debug"]


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e.strerror or ""):
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e) or type(e).__name__
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:2])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_main(prog: str, fn: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)`` with the error policy of the module docstring; returns the exit status."""
    debug, args = debug_requested(list(sys.argv[1:] if argv is None else argv))
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _raise_interrupt)  # run the cleanup, as Ctrl-C does
    try:
        from mckd.train.guards import TrainingAborted, TrainingInterrupted

        try:
            return fn(args)
        except user_errors() as e:
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {_message(e)}", file=sys.stderr)
            return 2
        except TrainingAborted as e:
            if debug:
                traceback.print_exc()
            print(f"{prog}: stopped: {_message(e)}", file=sys.stderr)
            return 1
        except (TrainingInterrupted, KeyboardInterrupt) as e:
            if debug:
                traceback.print_exc()
            print(f"{prog}: {_message(e) if isinstance(e, TrainingInterrupted) else 'interrupted'}",
                  file=sys.stderr)
            return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
