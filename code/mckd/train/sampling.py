"""Resumable data order: a distributed shuffling sampler that can start mid-epoch.

The order of epoch ``e`` is a permutation seeded by ``seed + e`` (the same on every rank, whatever
the world size), cut to a multiple of the world size and dealt round-robin to the ranks, like
``torch.utils.data.DistributedSampler(shuffle=True, drop_last=True)``. ``set_position(epoch,
start)`` skips the first ``start`` samples of this rank's share, so a resumed run sees exactly the
batches the interrupted run had not seen yet.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Args:
        n: dataset size.
        rank, world_size: this process and the number of processes.
        seed: data-order seed (the run's ``--seed``).
        shuffle: permute each epoch (dev evaluation does not use this sampler).
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if n < world_size:
            raise ValueError(f"{n} examples cannot be split across {world_size} processes")
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = n // world_size

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Epoch to draw and the number of this rank's samples to skip at its beginning."""
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = order[: self.per_rank * self.world]
        return order[self.rank::self.world][self.start:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)
