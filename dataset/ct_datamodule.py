"""Lightning datamodule of CT volumes: random 3D patches (TorchIO Queue) or whole volumes."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torchio as tio
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from dataset.dataset_info import window_for
from dataset.samplers import EpochRandomSampler
from dataset.intensity import HUWindow
from dataset.manifest import Manifest
from dataset.volume import ORIENTATION, lpi_to_dhw


class CTCollate:
    """Collate TorchIO subjects/patches into ``{"ct": (B, 1, D, H, W) in [-1, 1], "subject_id": list[str]}``."""

    def __init__(self, window: HUWindow) -> None:
        self.window = window

    def __call__(self, subjects: list[tio.Subject]) -> dict:
        # subjects are LPI (ToOrientation in the dataset), so a permutation gives (C, D, H, W)
        ct = torch.stack([self.window.to_unit(lpi_to_dhw(s["ct"].data)) for s in subjects])
        return {"ct": ct, "subject_id": [str(s["subject_id"]) for s in subjects]}


class _PatchStream(IterableDataset):
    """Iterates one epoch of patches from a fresh :class:`tio.Queue` and advances its DistributedSampler's epoch.

    An iterable dataset, so Lightning does not wrap the queue in a second DistributedSampler over
    patches (the subjects are already sharded by the queue's subject sampler). Each epoch's subjects,
    patch positions and patch order come from a random stream of its own, seeded by (seed, epoch, rank),
    and leave the global stream untouched: a run resumed at an epoch end sees the same patches.
    """

    def __init__(self, make_queue, subject_sampler: DistributedSampler | None, seed: int) -> None:
        self.make_queue, self.subject_sampler, self.seed, self.epoch = make_queue, subject_sampler, seed, 0
        self._length = len(make_queue())

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        if self.subject_sampler is not None:
            self.subject_sampler.set_epoch(epoch)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = torch.Generator().manual_seed((self.seed + 1_000_003 * epoch + 7919 * rank) % 2**63).get_state()
        queue = self.make_queue()
        for i in range(len(queue)):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(state)
                patch = queue[i]
                state = torch.get_rng_state()
            yield patch


class _PatchLoader(DataLoader):
    """DataLoader over a :class:`_PatchStream` whose epoch counter is saved in Lightning checkpoints (resume)."""

    def state_dict(self) -> dict:
        return {"epoch": int(self.dataset.epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.set_epoch(int(state.get("epoch", 0)))


class CTDataModule(L.LightningDataModule):
    """CT volumes from a manifest for autoencoder training.

    Train: random ``patch_size^3`` patches through a :class:`tio.Queue` (``samples_per_volume`` per
    subject, subjects sharded by a DistributedSampler when ``torch.distributed`` is initialised), or
    whole shuffled volumes when ``patch_size`` is None. Val / test: whole volumes.
    Batches: ``{"ct": float32 (B, 1, D, H, W) in [-1, 1], "subject_id": list[str]}``.

    Args:
        manifest: path of ``manifest.csv``.
        patch_size: cubic training patch edge in voxels, or None for whole volumes.
        samples_per_volume: patches drawn from each loaded subject.
        queue_length: maximum patches held by the queue.
        batch_size: training batch size.
        num_workers: workers loading subjects (inside the queue for patches).
        val_batch_size: batch size for val / test volumes.
        hu_min, hu_max: HU window; default from ``dataset.json`` next to the manifest.
        cache_rate: fraction (0-1) of each split's subjects loaded once in :meth:`setup` and kept in memory
            (as MONAI's ``CacheDataset``: the first ``int(n * cache_rate)``), so their files are read only once;
            workers share them. Each process holds its own cache (under DDP every rank caches every subject).
    """

    def __init__(self, manifest: str | os.PathLike, patch_size: int | None = 32, samples_per_volume: int = 4,
                 queue_length: int = 32, batch_size: int = 2, num_workers: int = 0, val_batch_size: int = 1,
                 hu_min: float | None = None, hu_max: float | None = None, cache_rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= cache_rate <= 1.0:
            raise ValueError(f"cache_rate={cache_rate}; expected a fraction in [0, 1]")
        if patch_size is not None and patch_size < 1:
            raise ValueError(f"patch_size={patch_size}; expected a positive int or None")
        if min(samples_per_volume, queue_length, batch_size, val_batch_size) < 1 or num_workers < 0:
            raise ValueError("samples_per_volume, queue_length, batch_size, val_batch_size must be >= 1, "
                             f"num_workers >= 0; got {samples_per_volume}, {queue_length}, {batch_size}, "
                             f"{val_batch_size}, {num_workers}")
        self.manifest_path = Path(manifest)
        self.patch_size, self.samples_per_volume, self.queue_length = patch_size, samples_per_volume, queue_length
        self.batch_size, self.num_workers, self.val_batch_size = batch_size, num_workers, val_batch_size
        self.window = window_for(self.manifest_path, hu_min, hu_max)
        self.collate = CTCollate(self.window)
        self.cache_rate = float(cache_rate)
        self.datasets: dict[str, tio.SubjectsDataset] = {}
        self._cache: dict[str, tio.Subject] = {}  # CT path -> loaded, reoriented subject (kept across setup calls)

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the manifest and build one subjects dataset per split."""
        manifest = Manifest.load(self.manifest_path)
        transform = tio.ToOrientation(ORIENTATION)
        self.datasets = {
            split: tio.SubjectsDataset(
                self._cached([tio.Subject(ct=tio.ScalarImage(p), subject_id=s)
                              for s, p in zip(rows["subject_id"], rows["ct"])], transform),
                transform=transform,  # a no-op on cached subjects, which are already reoriented
            )
            for split in ("train", "val", "test")
            for rows in [manifest.split(split)]
        }
        if len(self.datasets["train"]) == 0:
            raise ValueError(f"{self.manifest_path}: no subjects in split 'train'")

    def _cached(self, subjects: list[tio.Subject], transform: tio.Transform) -> list[tio.Subject]:
        """Replace the first ``int(len * cache_rate)`` subjects by loaded, reoriented copies (each file read once)."""
        n = int(len(subjects) * self.cache_rate)
        missing = [s for s in subjects[:n] if str(s["ct"].path) not in self._cache]
        with ThreadPoolExecutor(max(1, self.num_workers)) as pool:  # file I/O and gzip inflation release the GIL
            for s, loaded in zip(missing, pool.map(transform, missing)):
                self._cache[str(s["ct"].path)] = loaded
        return [self._cache[str(s["ct"].path)] for s in subjects[:n]] + subjects[n:]

    def _volumes(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        return DataLoader(self.datasets[split], batch_size=batch_size, num_workers=self.num_workers,
                          sampler=EpochRandomSampler(self.datasets[split]) if shuffle else None,
                          collate_fn=self.collate, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(torch.initial_seed() % 2**63))

    def train_dataloader(self) -> DataLoader:
        if self.patch_size is None:
            return self._volumes("train", self.batch_size, shuffle=True)
        if not self.datasets:
            self.setup()
        subjects = self.datasets["train"]
        shape = subjects[0]["ct"].spatial_shape
        if self.patch_size > min(shape):
            raise ValueError(f"patch_size={self.patch_size} exceeds the volume shape {tuple(shape)}")
        sampler = DistributedSampler(subjects, shuffle=True) if dist.is_available() and dist.is_initialized() else None
        def make_queue() -> tio.Queue:
            return tio.Queue(subjects, max_length=self.queue_length, samples_per_volume=self.samples_per_volume,
                             sampler=tio.UniformSampler(self.patch_size), subject_sampler=sampler,
                             num_workers=self.num_workers, shuffle_subjects=sampler is None, start_background=False)

        # the queue's own workers load subjects; its patch loader must stay in the main process. Its own
        # generator: starting an epoch draws nothing from the global random stream (exact resume)
        return _PatchLoader(_PatchStream(make_queue, sampler, torch.initial_seed()), batch_size=self.batch_size, num_workers=0,
                          collate_fn=self.collate, generator=torch.Generator().manual_seed(torch.initial_seed() % 2**63))

    def val_dataloader(self) -> DataLoader:
        return self._volumes("val", self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._volumes("test", self.val_batch_size, shuffle=False)
