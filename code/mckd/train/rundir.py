"""One writer per run directory, checkpoints pinned while they are read, and space checks.

* :class:`RunLock`: ``<save-dir>/run.lock`` holds the PID, host, process start time and start date
  of the process that writes the directory. It is created atomically (a complete file is
  hard-linked into place, so a reader never sees a half-written lock) before anything else is
  written; a second run or resume on the same directory is refused with a message naming the
  holder. A lock whose process is gone (same host, PID dead or reused by another process) is
  stale: it is taken over with a warning. A lock from another host cannot be checked and is
  never taken over.
* :func:`prepare_run_dir`: the checks a run does on its directory before it loads anything:
  writable, empty unless ``--resume``, and with ``--overwrite`` the old directory is moved aside
  whole (``<save-dir>.old-<date>``) so the new run starts from an empty one. The launcher's own
  files (``console.log``, ``command.sh``, written by scripts/lib/common.sh before the run starts)
  do not count as content.
* :func:`pin_checkpoint`: a reader (evaluation) leaves a marker in ``<ckpt>/.readers/``; checkpoint
  pruning skips a checkpoint with a live reader.
* :func:`check_free_space`: refuse a checkpoint save that cannot fit, with a clear message.

Command line (used by the scripts; exit status 2 with a one-line message on refusal)::

    python -m mckd.train.rundir state DIR       # empty | unfinished | finished | diverged
    python -m mckd.train.rundir set-aside DIR   # move DIR to DIR.old-<date> unless a live run holds it
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
READERS = ".readers"
LAUNCHER_FILES = frozenset({"console.log", "command.sh"})


class RunDirError(RuntimeError):
    """A run directory that cannot be used (held by another process, not writable, full disk)."""


# --------------------------------------------------------------------------- process identity
def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None elsewhere; tells a
    live process from an unrelated one that reuses its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 counted from the pid


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False  # the PID was reused by another process
    return True


def _identity(kind: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "kind": kind,
            "argv": sys.argv}


def describe(holder: dict) -> str:
    return (f"PID {holder.get('pid')} on {holder.get('host')} (a {holder.get('kind', 'run')} "
            f"started {holder.get('started')})")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_linked(path: Path, content: dict) -> None:
    """Create ``path`` with ``content`` atomically; FileExistsError when it exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content) + "\n")
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def holder_is_live(holder: dict | None) -> bool:
    """True unless the holder is on this host and its process is gone."""
    if not holder or holder.get("host") != socket.gethostname():
        return holder is not None  # another host (cannot check): treat as live
    try:
        return _alive(int(holder["pid"]), holder.get("proc_start"))
    except (KeyError, TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- the lock
class RunLock:
    """The writer lock of one run directory (see the module docstring). Use as a context manager
    or call :meth:`acquire` / :meth:`release`."""

    def __init__(self, directory: str | os.PathLike, kind: str = "training run"):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.kind = kind
        self.held = False

    def acquire(self) -> "RunLock":
        me = _identity(self.kind)
        for _ in range(3):
            try:
                _write_linked(self.path, me)
                self.held = True
                return self
            except FileExistsError:
                pass
            holder = _read_json(self.path)
            if holder is None:
                # unreadable: another process may be between link and write (cannot happen with
                # the link protocol) or the file is damaged; only an old one is taken over
                age = _age(self.path)
                if age is None:
                    continue
                if age < 60:
                    raise RunDirError(f"{self.path} exists and is unreadable; remove it if no run "
                                      "uses the directory")
            elif holder_is_live(holder):
                raise RunDirError(
                    f"{self.dir} is in use by {describe(holder)}; wait for it to end, or remove "
                    f"{self.path} if that process no longer runs")
            stale = self.path.with_name(f".{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.replace(self.path, stale)
            except FileNotFoundError:
                continue  # someone else removed it: try again
            moved = _read_json(stale)
            if moved != holder:  # another process took the lock in between: give it back
                with contextlib.suppress(OSError):
                    os.link(stale, self.path)
                stale.unlink(missing_ok=True)
                continue
            stale.unlink(missing_ok=True)
            logger.warning("took over the stale lock %s of %s: that process is gone", self.path,
                           describe(holder or {}))
        raise RunDirError(f"could not take the lock {self.path} (another process keeps taking it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read_json(self.path)
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _age(path: Path) -> float | None:
    try:
        return _dt.datetime.now().timestamp() - path.stat().st_mtime
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- directory checks
def run_entries(directory: str | os.PathLike) -> list[str]:
    """What a run wrote into ``directory`` (launcher files and the lock excluded)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.name not in LAUNCHER_FILES and p.name != LOCK_NAME
                  and not p.name.startswith(f".{LOCK_NAME}"))


def _move_aside(d: Path, lock: RunLock) -> Path:
    """Rename ``d`` (whose lock this process holds) to ``<d>.old-<date>[-N]``; the lock goes with it
    and is dropped there."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = d.with_name(f"{d.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = d.with_name(f"{d.name}.old-{stamp}-{n}")
    os.rename(d, target)
    lock.held = False
    (target / LOCK_NAME).unlink(missing_ok=True)
    return target


def set_aside(directory: str | os.PathLike) -> Path:
    """Move ``directory`` whole to ``<directory>.old-<date>[-N]`` unless a live process holds its
    lock. Returns the new path."""
    d = Path(directory)
    lock = RunLock(d, kind="set-aside").acquire()
    try:
        return _move_aside(d, lock)
    finally:
        lock.release()


@dataclass
class PreparedRunDir:
    """A run directory taken by :func:`prepare_run_dir`: the lock, whether the directory was
    created here, and (``--overwrite``) whether the old run still has to be moved aside."""

    lock: RunLock
    created: bool
    pending_overwrite: bool = False
    set_aside: Path | None = None

    def commit(self) -> None:
        """Called right before the run writes its first file: ``--overwrite`` moves the old run
        aside now (not earlier, so a run that fails while loading changes nothing) and takes a
        fresh, empty directory."""
        if not self.pending_overwrite:
            return
        d = self.lock.dir
        try:
            self.set_aside = _move_aside(d, self.lock)
            d.mkdir()
        except OSError as e:
            raise RunDirError(f"--save-dir: cannot move {d} aside for --overwrite ({e})") from None
        self.pending_overwrite = False
        self.lock = RunLock(d).acquire()
        logger.warning("--overwrite: the previous run in %s was moved to %s", d, self.set_aside)

    def abandon(self) -> None:
        """Undo :func:`prepare_run_dir` after a failure before the run wrote anything: release the
        lock and remove the directory if it was created here and is still empty."""
        self.lock.release()
        if self.created:
            with contextlib.suppress(OSError):
                self.lock.dir.rmdir()


def prepare_run_dir(save_dir: str | os.PathLike, *, overwrite: bool, resume: bool) -> PreparedRunDir:
    """Take the run directory for this process before anything else is written.

    Raises:
        RunDirError: not a directory, not writable, held by a live run, or not empty without
            ``--resume`` / ``--overwrite`` (the message names the flag).
    """
    d = Path(save_dir)
    if d.exists() and not d.is_dir():
        raise RunDirError(f"--save-dir: {d} exists and is not a directory")
    _check_empty(d, resume=resume, overwrite=overwrite)  # before the lock: a refusal touches nothing
    created = False
    if not d.exists():
        try:
            d.mkdir(parents=True)
        except OSError as e:
            raise RunDirError(f"--save-dir: cannot create {d} ({e.strerror or e})") from None
        created = True
    if not os.access(d, os.W_OK | os.X_OK):
        raise RunDirError(f"--save-dir: {d} is not writable")
    lock = RunLock(d)
    try:
        lock.acquire()
    except PermissionError as e:
        raise RunDirError(f"--save-dir: {d} is not writable ({e.strerror})") from None
    except RunDirError:
        if created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    try:
        _check_empty(d, resume=resume, overwrite=overwrite)  # again, now that the lock is held
    except RunDirError:
        lock.release()
        raise
    entries = run_entries(d)
    return PreparedRunDir(lock=lock, created=created, pending_overwrite=bool(overwrite and entries))


def _check_empty(d: Path, *, resume: bool, overwrite: bool) -> None:
    entries = run_entries(d)
    if entries and not resume and not overwrite:
        holder = _read_json(d / LOCK_NAME)
        busy = f"; it is in use by {describe(holder)}" if holder_is_live(holder) else ""
        raise RunDirError(f"--save-dir: {d} is not empty ({', '.join(entries[:4])}"
                          f"{', ...' if len(entries) > 4 else ''}){busy}; pass --resume to continue "
                          "the run there or --overwrite to move it aside and start a new one")


def check_free_space(directory: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Raise RunDirError when ``directory``'s file system has less than ``need_bytes`` free."""
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise RunDirError(f"not enough disk space for {what} in {directory}: about "
                          f"{need_bytes / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free")


def no_space_error(err: BaseException, where: str | os.PathLike) -> RunDirError | None:
    """A RunDirError when ``err`` comes from a full disk or quota, else None. ``torch.save`` reports
    a failed write as a RuntimeError without errno; then the free space decides (< 64 MiB)."""
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and isinstance(err, RuntimeError) and "write" in str(err):
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(Path(where).parent).free < (64 << 20)
    if full:
        return RunDirError(f"disk full while writing {where}; free some space and continue with --resume")
    return None


# --------------------------------------------------------------------------- readers
@contextlib.contextmanager
def pin_checkpoint(ckpt: str | os.PathLike):
    """Mark ``ckpt`` as being read by this process for the duration of the block.

    Pruning (:func:`mckd.train.checkpoint.prune_checkpoints`) never removes a checkpoint with a
    live reader. Raises RunDirError when the checkpoint is gone when the block starts or ends. A
    checkpoint whose directory cannot be written (a read-only model store) is read unpinned.
    """
    ckpt = Path(ckpt)
    marker = ckpt / READERS / f"{socket.gethostname()}-{os.getpid()}.json"
    pinned = False
    try:
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(json.dumps(_identity("evaluation")) + "\n")
        pinned = True
    except FileNotFoundError:
        raise RunDirError(f"checkpoint {ckpt} disappeared (removed by the training run's pruning?)") from None
    except OSError:
        logger.debug("%s is not writable: read without a reader marker", ckpt)
    try:
        yield
        if not ckpt.is_dir() or (pinned and not marker.is_file()):
            raise RunDirError(f"checkpoint {ckpt} disappeared while it was read")
    finally:
        if pinned:
            marker.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                marker.parent.rmdir()


def live_readers(ckpt: str | os.PathLike) -> list[dict]:
    d = Path(ckpt) / READERS
    if not d.is_dir():
        return []
    out = []
    for f in d.glob("*.json"):
        holder = _read_json(f)
        if holder is None or holder_is_live(holder):
            out.append(holder or {"file": str(f)})
    return out


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mckd.train.rundir",
                                description="Run-directory state and set-aside for the scripts.")
    p.add_argument("command", choices=("state", "set-aside"))
    p.add_argument("dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "state":
        from mckd.train.checkpoint import run_state

        print(run_state(args.dir).status)
        return 0
    if not Path(args.dir).is_dir():
        return 0
    try:
        print(set_aside(args.dir))
    except (RunDirError, OSError) as e:
        print(f"rundir set-aside: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
