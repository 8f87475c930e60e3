"""Lightning datamodule of paired X-ray / CT / latent samples (diffusion training and generation)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, Lambda
from torch.utils.data import DataLoader, Dataset

from dataset.dataset_info import FILE_NAME, DatasetInfo, window_for
from dataset.drr import DRRGeometry
from dataset.manifest import Manifest
from dataset.paired_dataset import PairedDataset
from dataset.samplers import EpochRandomSampler
from dataset.radiograph_style import RadiographStyle, StyledXrays


class PairedDataModule(L.LightningDataModule):
    """Train / val / test loaders over :class:`PairedDataset`, split by the manifest's ``split`` column.

    Batches are dicts: ``"ap"``, ``"lat"`` ``(B, 1, h, w)`` in [0, 1]; ``"ct"`` ``(B, 1, D, H, W)`` in
    [-1, 1] and ``"latent"`` ``(B, ...)`` when asked for in ``load``; ``"label"`` long ``(B,)``;
    ``"subject_id"`` ``list[str]``; ``"geometry"`` float32 ``(B, 2, 10)``, each pair's DRR geometry, when
    ``dataset.json`` records one (per-subject manifest columns over it). Under DDP Lightning adds the
    DistributedSampler.

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
        geometry = self._geometry(manifest)
        try:
            datasets = {s: PairedDataset(manifest.split(s), self.load, self.window, geometry)
                        for s in ("train", "val", "test")}
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

    def _geometry(self, manifest: Manifest) -> DRRGeometry | None:
        """The default DRR geometry from ``dataset.json`` (None without one, then no geometry columns allowed)."""
        info_path = self.manifest_path.parent / FILE_NAME
        geometry = DatasetInfo.load(info_path).geometry if info_path.is_file() else None
        columns = sorted(set(DRRGeometry().to_columns()) & set(manifest.frame.columns))
        if geometry is None and columns:
            raise ValueError(f"{self.manifest_path}: has geometry columns {columns[:3]}... but {info_path} records no "
                             "default DRR geometry; expected the dataset's geometry in dataset.json")
        return geometry

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        # the training order depends on (seed, epoch) only, and loading draws nothing from the global random
        # stream, so a run resumed at an epoch end sees the same batches as an uninterrupted one
        return DataLoader(self.datasets[split], batch_size=self.batch_size,
                          sampler=EpochRandomSampler(self.datasets[split]) if shuffle else None,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          drop_last=self.drop_last and shuffle, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(torch.initial_seed() % 2**63))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
