"""CT preprocessing in one place: orientation, resampling, HU clipping and crop/pad to a fixed shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torchio as tio

from dataset.intensity import HUWindow
from dataset.volume import ORIENTATION, image_to_volume, volume_to_image


def _triple(value: float | int | tuple | list, name: str, kind: type) -> tuple:
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{name}={value!r} is invalid; expected one or three positive numbers (D, H, W)")
    return tuple(kind(v) for v in values)


@dataclass(frozen=True)
class Preprocessor:
    """Turn a CT in HU (any orientation / spacing / size) into a fixed-shape, fixed-spacing volume.

    Steps: reorient to LPI (our ``(D, H, W)`` axes), resample (linear, anti-aliased when
    downsampling) to ``spacing``, clip HU to ``window``, then centre crop / pad with ``window.hu_min``
    to ``shape``. With ``fit=True`` the spacing is instead isotropic and equal to the largest physical
    extent divided by the largest target size, so the whole scan fits without cropping (demo mode).

    Args:
        shape: target size ``(D, H, W)`` (an int means a cube), default 256^3.
        spacing: target spacing in mm along ``(D, H, W)`` (an int/float means isotropic).
        window: HU clipping window.
        fit: fit the whole scan into ``shape`` with isotropic spacing instead of using ``spacing``.
    """

    shape: tuple[int, int, int] = (256, 256, 256)
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    window: HUWindow = field(default_factory=HUWindow)
    fit: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _triple(self.shape, "shape", int))
        object.__setattr__(self, "spacing", _triple(self.spacing, "spacing", float))

    def target_spacing(self, image: tio.ScalarImage) -> tuple[float, float, float]:
        """Spacing ``(D, H, W)`` in mm that :meth:`__call__` resamples ``image`` to."""
        if not self.fit:
            return self.spacing
        extent = max(n * s for n, s in zip(image.spatial_shape, image.spacing))
        iso = float(extent) / max(self.shape)
        return (iso, iso, iso)

    def __call__(self, image: tio.ScalarImage) -> tio.ScalarImage:
        """Preprocess one CT.

        Args:
            image: one-channel image in HU.

        Returns:
            An LPI image of spatial size ``shape`` (reversed, as TorchIO holds ``(W, H, D)``),
            float32 HU within the window.
        """
        image = tio.ToOrientation(ORIENTATION)(image)
        sd, sh, sw = self.target_spacing(image)
        # anti-aliasing matters when a 512^2 scan is shrunk to 64^3
        image = tio.Resample((sw, sh, sd), antialias=True)(image)
        data = self.window.clip(image.data)
        image = tio.ScalarImage(tensor=data, affine=image.affine)
        d, h, w = self.shape
        return tio.CropOrPad((w, h, d), padding_mode=self.window.hu_min)(image)

    def to_dict(self) -> dict:
        """Plain dict for dataset.json."""
        d = asdict(self)
        d["window"] = self.window.to_dict()
        d["shape"], d["spacing"] = list(self.shape), list(self.spacing)
        return d


def preprocessed_volume(image: tio.ScalarImage, window: HUWindow) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """A preprocessed HU image as our network input: float32 ``(1, D, H, W)`` in [-1, 1] plus spacing (D, H, W)."""
    volume, spacing = image_to_volume(image)
    return window.to_unit(volume), spacing


def unit_volume_to_image(volume: torch.Tensor, spacing_dhw: tuple[float, float, float],
                         window: HUWindow) -> tio.ScalarImage:
    """A generated ``(1, D, H, W)`` volume in [-1, 1] back to an HU image (LPI, centred) for saving."""
    return volume_to_image(window.to_hu(volume), spacing_dhw)
