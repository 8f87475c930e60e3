"""A shuffling sampler whose order is a function of (seed, epoch) alone, so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


class EpochRandomSampler(RandomSampler):
    """``RandomSampler`` (without replacement) drawing each epoch's permutation from ``seed + epoch``.

    Lightning calls :meth:`set_epoch` before every epoch, also when it resumes from a checkpoint, so the
    order does not depend on how much of the global random stream was used before. Under DDP Lightning
    replaces it by a ``DistributedSampler``, which is seeded the same way.

    Args:
        data_source: the dataset.
        seed: base seed (default: ``torch.initial_seed()``, i.e. the run's seed after ``seed_everything``).
    """

    def __init__(self, data_source: Sized, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` from now on."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed + 1_000_003 * self.epoch) % (2**63))
        yield from torch.randperm(len(self.data_source), generator=g).tolist()
