"""``dataset.json``: how a prepared dataset was made (window, spacing, shape, DRR geometry, split seed).

``geometry`` is absent (``None``) for datasets whose X-rays were imported rather than rendered here
(``dataset.convert_pt`` without a geometry). Callers that project (DRR re-projection metrics,
cone-beam back-projection grids) must check for ``None`` and skip / fall back to parallel-beam.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dataset.drr import DRRGeometry
from dataset.intensity import HUWindow
from dataset.io import atomic_write_json

FILE_NAME = "dataset.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What every later stage needs to know about a prepared dataset.

    Args:
        window: HU window used for the [-1, 1] mapping.
        spacing: voxel spacing in mm along ``(D, H, W)``.
        shape: volume size ``(D, H, W)``.
        geometry: the DRR geometry of the stored AP / LAT images, or None when it is unknown
            (imported X-rays).
        split_seed: seed of the train/val/test split.
        extra: anything else recorded (preprocessing settings, label names, source).
    """

    window: HUWindow
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    geometry: DRRGeometry | None
    split_seed: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetInfo":
        """Read ``dataset.json`` from a prepared dataset folder, or from the JSON file itself.

        Raises:
            FileNotFoundError: no dataset.json there.
            ValueError: the file is not valid JSON or lacks a field.
        """
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; expected the dataset.json of a prepared dataset")
        try:
            d = json.loads(path.read_text())
            return cls(
                window=HUWindow.from_dict(d["window"]),
                spacing=tuple(float(s) for s in d["spacing"]),
                shape=tuple(int(s) for s in d["shape"]),
                geometry=DRRGeometry.from_dict(d["geometry"]) if d.get("geometry") is not None else None,
                split_seed=int(d.get("split_seed", 0)),
                extra={k: v for k, v in d.items() if k not in ("window", "spacing", "shape", "geometry", "split_seed")},
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid dataset.json ({type(e).__name__}: {e})") from e

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what :meth:`save` writes); no ``geometry`` key when it is unknown."""
        d = {"window": self.window.to_dict(), "spacing": list(self.spacing), "shape": list(self.shape)}
        if self.geometry is not None:
            d["geometry"] = self.geometry.to_dict()
        return {**d, "split_seed": self.split_seed, **self.extra}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to ``path`` (a folder gets ``dataset.json`` inside)."""
        path = Path(path)
        atomic_write_json(path / FILE_NAME if path.is_dir() else path, self.to_dict())


def window_for(manifest: str | os.PathLike, hu_min: float | None = None, hu_max: float | None = None) -> HUWindow:
    """The HU window for a manifest: explicit values win, else its folder's dataset.json, else the default."""
    if hu_min is not None and hu_max is not None:
        return HUWindow(hu_min, hu_max)
    if (hu_min is None) != (hu_max is None):
        raise ValueError(f"hu_min={hu_min}, hu_max={hu_max}; expected both or neither")
    info_path = Path(manifest).parent / FILE_NAME
    return DatasetInfo.load(info_path).window if info_path.is_file() else HUWindow()
