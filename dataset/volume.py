"""TorchIO images (RAS world, data ``(C, I, J, K)``) <-> our volume layout ``(C, D, H, W)``.

Our layout: ``D`` superior -> inferior, ``H`` anterior -> posterior, ``W`` patient right -> left.
An image reoriented to ``LPI`` (i -> patient left, j -> posterior, k -> inferior) holds exactly these
axes in reverse order, so the conversion is a reorientation plus a ``(C, I, J, K) -> (C, K, J, I)``
permutation. Nothing else in the project permutes axes.
"""

from __future__ import annotations

import numpy as np
import torch
import torchio as tio
from einops import rearrange

ORIENTATION = "LPI"


def lpi_to_dhw(data: torch.Tensor) -> torch.Tensor:
    """Permute the last three axes of LPI-ordered data ``(..., I, J, K)`` to ``(..., D, H, W)``."""
    return rearrange(data, "... i j k -> ... k j i")


def dhw_to_lpi(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`lpi_to_dhw`: ``(..., D, H, W)`` -> LPI-ordered ``(..., I, J, K)``."""
    return rearrange(data, "... d h w -> ... w h d")


def image_to_volume(image: tio.ScalarImage) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Convert a TorchIO image of any orientation to our layout.

    Args:
        image: a 3-D TorchIO image, data ``(C, I, J, K)``.

    Returns:
        ``(volume, spacing)``: the data as ``(C, D, H, W)`` (dtype kept) and the voxel spacing in mm
        along ``(D, H, W)``.
    """
    if image.orientation != tuple(ORIENTATION):
        image = tio.ToOrientation(ORIENTATION)(image)
    sx, sy, sz = (float(s) for s in image.spacing)  # spacing along (I, J, K) = (W, H, D)
    return lpi_to_dhw(image.data), (sz, sy, sx)


def volume_affine(shape_dhw: tuple[int, int, int], spacing_dhw: tuple[float, float, float],
                  centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The 4x4 RAS affine of an LPI image holding a ``(D, H, W)`` volume.

    Args:
        shape_dhw: volume size ``(D, H, W)``.
        spacing_dhw: voxel spacing in mm along ``(D, H, W)``.
        centre: RAS world position (mm) of the volume centre.
    """
    d, h, w = shape_dhw
    sd, sh, sw = spacing_dhw
    affine = np.diag([-sw, -sh, -sd, 1.0])  # i -> left (-x), j -> posterior (-y), k -> inferior (-z)
    half = np.array([(w - 1) / 2, (h - 1) / 2, (d - 1) / 2])
    affine[:3, 3] = np.asarray(centre, dtype=float) - affine[:3, :3] @ half
    return affine


def volume_to_image(volume: torch.Tensor, spacing_dhw: tuple[float, float, float],
                    affine: np.ndarray | None = None) -> tio.ScalarImage:
    """Wrap a ``(C, D, H, W)`` volume as an LPI TorchIO image.

    Args:
        volume: ``(C, D, H, W)`` tensor (any dtype, any value range).
        spacing_dhw: voxel spacing in mm along ``(D, H, W)``; ignored when ``affine`` is given.
        affine: optional LPI affine to reuse (e.g. from :func:`image_to_volume`'s source image);
            default centres the volume at the world origin.
    """
    if volume.ndim != 4:
        raise ValueError(f"volume has shape {tuple(volume.shape)}; expected (C, D, H, W)")
    if affine is None:
        if len(spacing_dhw) != 3 or min(spacing_dhw) <= 0:
            raise ValueError(f"spacing {spacing_dhw} is invalid; expected three positive mm values (D, H, W)")
        affine = volume_affine(tuple(volume.shape[1:]), spacing_dhw)
    return tio.ScalarImage(tensor=dhw_to_lpi(volume), affine=affine)
