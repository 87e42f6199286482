"""Distributed helpers in one place: init/cleanup, rank checks, reductions, rank-0 logging, and
the evaluation's process context (:class:`DistContext`, :func:`init_evaluation`).

Works for a single process (no process group: every helper is a no-op), ``torchrun`` (DDP, gloo on
CPU, nccl on GPU, single or multi node) and the ``deepspeed`` launcher (``deepspeed.init_distributed``).
Rank, world size and local rank always come from the environment variables that every launcher sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), never from command-line flags.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

logger = logging.getLogger(__name__)
_ENV_SET: list[str] = []   # environment variables init_distributed set (cleanup unsets them)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def resolve_backend(backend: str = "auto") -> str:
    """``auto``: nccl when CUDA is available, gloo otherwise."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("--ddp-backend nccl needs CUDA; use gloo (or auto) on CPU")
    return backend


def device_for_rank() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (and selected), else CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_distributed(backend: str = "auto", *, deepspeed: bool = False, timeout_min: int = 30,
                     device_id: torch.device | None = None) -> None:
    """Join the process group when launched with several processes (or always under DeepSpeed).

    Args:
        backend: "auto" | "nccl" | "gloo".
        deepspeed: use ``deepspeed.init_distributed`` (it also handles the MPI-style environments of
            the deepspeed launcher on multi-node hostfiles).
        timeout_min: collective timeout.
        device_id: this rank's GPU, bound to the group (plain torch.distributed only).
    """
    if is_initialized():
        return
    backend = resolve_backend(backend)
    timeout = datetime.timedelta(minutes=timeout_min)
    if deepspeed:
        import deepspeed as ds

        # A single process without a launcher: fill the rendezvous variables (a free local port),
        # and remember them so that cleanup() leaves the environment as it found it.
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        for key, value in defaults.items():
            if key not in os.environ:
                os.environ[key] = value
                _ENV_SET.append(key)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
            _ENV_SET.append("MASTER_PORT")
        if backend == "gloo":
            # On CPU DeepSpeed builds a shared-memory all-reduce kernel at start-up (about 20 s of
            # C++ compilation in every fresh environment) that only its inference all-reduce uses;
            # training collectives go through gloo, so the kernel is declared unavailable.
            ds.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds.init_distributed(dist_backend=backend, timeout=timeout)
    elif env_world_size() > 1:
        kw = {"device_id": device_id} if device_id is not None else {}
        tdist.init_process_group(backend=backend, timeout=timeout, **kw)
    if is_initialized():
        logger.info("process group: backend %s, rank %d of %d (local rank %d)", backend, rank(),
                    world_size(), local_rank())


def cleanup() -> None:
    """Destroy the process group, and DeepSpeed's cached groups with it, and unset the
    rendezvous variables :func:`init_distributed` set, so that a later run in the same process
    (tests, notebooks, in-process sweeps) or a launcher it starts begins from a clean state."""
    if is_initialized():
        tdist.destroy_process_group()
    _reset_deepspeed_groups()
    while _ENV_SET:
        os.environ.pop(_ENV_SET.pop(), None)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reset_deepspeed_groups() -> None:
    """DeepSpeed caches sub-groups of the first process group in module globals
    (``deepspeed.utils.groups``); after ``destroy_process_group`` they name a dead group and the next
    ``deepspeed.initialize`` in this process fails ("Group ... is not registered")."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if name.endswith("_GROUP") and name.startswith("_"):
            setattr(groups, name, {} if isinstance(value, dict) else None)
        elif name.endswith("_GROUP_RANKS") and isinstance(value, dict):
            value.clear()


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group). Returns ``t``."""
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, out of place (what ``Criterion.after_optimizer_step`` receives)."""
    t = t.detach().clone()
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t /= world_size()
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's object, in rank order (``[obj]`` without a process group)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Make parameters and buffers identical on every rank (rank ``src`` wins)."""
    if not (is_initialized() and world_size() > 1):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            tdist.broadcast(t.data, src=src)


class RankZeroFilter(logging.Filter):
    """Drops records on ranks other than 0 (attach to handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return is_main()


# --------------------------------------------------------------------------- evaluation
@dataclass
class DistContext:
    """The process context of an evaluation run (one process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def gather_to_main(self, obj):
        """List of every rank's ``obj`` on rank 0 (rank order); ``None`` on other ranks."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        tdist.gather_object(obj, out, dst=0)
        return out

    def broadcast_from_main(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        return broadcast_object(obj, src=0)

    def close(self) -> None:
        """Leave the process group if :func:`init_evaluation` joined it."""
        if self.owns_group:
            cleanup()


def init_evaluation(device: str = "auto") -> DistContext:
    """Join the torchrun group if there is one (nccl on GPU, gloo on CPU) and pick this rank's
    device.

    Args:
        device: ``auto`` (the rank's GPU when CUDA is available, else CPU), ``cpu`` or ``cuda``.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    dev = torch.device("cuda", local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = env_world_size() > 1 and not is_initialized()
    if owns:
        init_distributed("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistContext(rank=int(os.environ.get("RANK", "0")), world_size=env_world_size(),
                       local_rank=local_rank(), device=dev, owns_group=owns)
