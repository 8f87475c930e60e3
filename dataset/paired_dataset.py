"""Paired samples (AP, LAT, optionally CT and latent) from a prepared dataset's manifest."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch.utils.data import Dataset

from dataset.drr import DRRGeometry
from dataset.intensity import HUWindow
from dataset.io import read_ct
from dataset.radiograph import read_radiograph
from dataset.volume import image_to_volume

LOADABLE = ("ap", "lat", "ct", "latent")


class PairedDataset(Dataset):
    """One item per manifest row.

    Args:
        frame: manifest rows with absolute paths (``Manifest.split(...)``).
        load: which of ``"ap"``, ``"lat"``, ``"ct"``, ``"latent"`` to read.
        window: HU window for the CT's [-1, 1] mapping.
        geometry: the dataset's DRR geometry (``dataset.json``); when given, every item carries its own
            geometry: the row's geometry columns (``DRRGeometry.to_columns``) over this default.

    Items are dicts: ``"ap"`` / ``"lat"`` float32 ``(1, h, w)`` in [0, 1], ``"ct"`` float32
    ``(1, D, H, W)`` in [-1, 1], ``"latent"`` the tensor stored in the row's ``latent`` file,
    ``"label"`` a long scalar, ``"subject_id"`` a str, and with ``geometry`` ``"geometry"`` float32
    ``(2, 10)`` (``DRRGeometry.to_tensor``, AP row first). Default collation stacks them into batches.
    """

    def __init__(self, frame: pd.DataFrame, load: Sequence[str] = ("ap", "lat"), window: HUWindow = HUWindow(),
                 geometry: DRRGeometry | None = None) -> None:
        bad = [k for k in load if k not in LOADABLE]
        if bad or not load:
            raise ValueError(f"load={tuple(load)!r} is invalid; expected a non-empty subset of {LOADABLE}")
        missing = [k for k in load if k not in frame.columns]
        if missing:
            raise ValueError(f"manifest has no column(s) {missing} to load; columns are {list(frame.columns)}")
        self.frame = frame.reset_index(drop=True)
        self.load = tuple(load)
        self.window = window
        self.geometries = None
        if geometry is not None:  # read and checked once, here, so a bad column names its subject up front
            self.geometries = []
            for _, row in self.frame.iterrows():
                self.geometries.append(DRRGeometry.from_columns(row, geometry).to_tensor(torch.float32))

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict:
        row = self.frame.iloc[index]
        sid = str(row["subject_id"])
        item: dict = {}
        for key in self.load:
            if key in ("ap", "lat"):
                item[key] = read_radiograph(row[key]).image
            elif key == "ct":
                volume, _ = image_to_volume(read_ct(row[key], check=False))
                item[key] = self.window.to_unit(volume)
            else:
                item[key] = _load_latent(row[key])
        if "ap" in item and "lat" in item and item["ap"].shape != item["lat"].shape:
            raise ValueError(f"subject {sid}: AP {tuple(item['ap'].shape)} and LAT {tuple(item['lat'].shape)} "
                             f"differ in size ({row['ap']}, {row['lat']}); expected one detector size")
        item["label"] = torch.tensor(int(row["label"]), dtype=torch.long)
        item["subject_id"] = sid
        if self.geometries is not None:
            item["geometry"] = self.geometries[index].clone()
        return item


def _load_latent(path: str) -> torch.Tensor:
    from dataset.latents import read_latent

    return read_latent(path)[0]
