"""Lightning datamodule of paired X-ray / CT / latent samples (diffusion training and generation)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
from monai.data import CacheDataset
from monai.transforms import Compose, Lambda
from torch.utils.data import DataLoader, Dataset

from dataset.dataset_info import window_for
from dataset.manifest import Manifest
from dataset.paired_dataset import PairedDataset
from dataset.radiograph_style import RadiographStyle, StyledXrays


class PairedDataModule(L.LightningDataModule):
    """Train / val / test loaders over :class:`PairedDataset`, split by the manifest's ``split`` column.

    Batches are dicts: ``"ap"``, ``"lat"`` ``(B, 1, h, w)`` in [0, 1]; ``"ct"`` ``(B, 1, D, H, W)`` in
    [-1, 1] and ``"latent"`` ``(B, ...)`` when asked for in ``load``; ``"label"`` long ``(B,)``;
    ``"subject_id"`` ``list[str]``. Under DDP Lightning adds the DistributedSampler.

    Args:
        manifest: path of ``manifest.csv``.
        batch_size: batch size for every split.
        num_workers: DataLoader workers.
        load: which of ``"ap"``, ``"lat"``, ``"ct"``, ``"latent"`` to read.
        hu_min, hu_max: HU window; default from ``dataset.json`` next to the manifest.
        pin_memory: passed to the DataLoaders.
        drop_last: drop the last incomplete training batch.
        cache_rate: fraction (0-1) of each split's items read once in :meth:`setup` and kept in memory
            (MONAI ``CacheDataset``: the first ``int(n * cache_rate)``); workers share them. Each process holds its
            own cache. Cached datasets are built once; later ``setup`` calls keep them.
        xray_augment: settings of the radiograph-style augmentation of the training split's X-rays
            (``dataset.RadiographStyle`` fields, ``enabled: false`` or None for none).
    """

    def __init__(self, manifest: str | os.PathLike, batch_size: int = 2, num_workers: int = 0,
                 load: Sequence[str] = ("ap", "lat", "latent"), hu_min: float | None = None,
                 hu_max: float | None = None, pin_memory: bool = False, drop_last: bool = False,
                 cache_rate: float = 0.0, xray_augment: Mapping | None = None) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size}, num_workers={num_workers}; expected >= 1 and >= 0")
        if not 0.0 <= cache_rate <= 1.0:
            raise ValueError(f"cache_rate={cache_rate}; expected a fraction in [0, 1]")
        self.cache_rate = float(cache_rate)
        self.manifest_path = Path(manifest)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.load, self.pin_memory, self.drop_last = tuple(load), pin_memory, drop_last
        self.window = window_for(self.manifest_path, hu_min, hu_max)
        self.datasets: dict[str, Dataset] = {}
        self.xray_augment = RadiographStyle.from_config(xray_augment)

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the manifest, build one dataset per split (a :class:`PairedDataset`, wrapped in a
        ``CacheDataset`` when ``cache_rate > 0``)."""
        if self.datasets and self.cache_rate > 0:
            return  # keep the cache: a second fit / validate must not read the files again
        manifest = Manifest.load(self.manifest_path)
        try:
            datasets = {s: PairedDataset(manifest.split(s), self.load, self.window) for s in ("train", "val", "test")}
        except ValueError as e:
            raise ValueError(f"{self.manifest_path}: {e}") from e
        if self.cache_rate > 0:
            # CacheDataset caches the output of its deterministic transforms; reading one item is that transform
            datasets = {s: CacheDataset(list(range(len(d))), Compose([Lambda(d.__getitem__)]), cache_rate=self.cache_rate,
                                        num_workers=max(1, self.num_workers), progress=False)
                        for s, d in datasets.items()}
        if self.xray_augment is not None:
            datasets["train"] = StyledXrays(datasets["train"], self.xray_augment)
        self.datasets = datasets

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          drop_last=self.drop_last and shuffle, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
