"""Preprocessor on anisotropic, non-cubic NIfTI files stored in different orientations: the axes come out as
(D, H, W) = (superior -> inferior, anterior -> posterior, patient right -> left), spacings in the same order."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dataset import HUWindow, Preprocessor, image_to_volume, read_ct

# the anatomy, in voxels: 12 axial slices of 2.5 mm, 16 rows of 0.9 mm front to back, 20 columns of 0.7 mm
# across; the marker is a 2 x 4 x 4 voxel block of bone at slices 2-3 (counted from the top), rows 2-5 (from
# the front) and columns 3-6 (from the patient's right side)
SIZE_SI, SIZE_AP, SIZE_RL = 12, 16, 20
SPACING_SI, SPACING_AP, SPACING_RL = 2.5, 0.9, 0.7
MARKER = {"SI": range(2, 4), "AP": range(2, 6), "RL": range(3, 7)}

# How each file stores the anatomy: for voxel axes i, j, k, the anatomical axis ('SI', 'AP', 'RL') and
# whether the index increases towards the first-named side (superior, anterior, right).
ORIENTATIONS = {
    # RAS+: i -> right, j -> anterior, k -> superior (what most scanners' NIfTI exports use)
    "RAS": [("RL", True), ("AP", True), ("SI", True)],
    # i -> superior, j -> left, k -> posterior (a permuted, partly flipped storage)
    "SLP": [("SI", True), ("RL", False), ("AP", False)],
}
SIZES = {"SI": SIZE_SI, "AP": SIZE_AP, "RL": SIZE_RL}
SPACINGS = {"SI": SPACING_SI, "AP": SPACING_AP, "RL": SPACING_RL}
# RAS world direction of moving towards the first-named side of each anatomical axis
TOWARDS = {"RL": np.array([1.0, 0, 0]), "AP": np.array([0, 1.0, 0]), "SI": np.array([0, 0, 1.0])}


def _write_marked_ct(path: Path, orientation: str, spacings: dict[str, float] = SPACINGS) -> np.ndarray:
    """Air-filled NIfTI with the bone marker, stored in ``orientation``; returns the marker's centre (RAS mm)."""
    axes = ORIENTATIONS[orientation]
    shape = tuple(SIZES[a] for a, _ in axes)
    affine = np.eye(4)
    for col, (a, towards_first) in enumerate(axes):
        affine[:3, col] = TOWARDS[a] * spacings[a] * (1 if towards_first else -1)
    data = np.full(shape, -1000.0, dtype=np.float32)
    index, centre = [], []
    for a, towards_first in axes:  # the marker's ranges are counted from superior / anterior / right
        n, r = SIZES[a], MARKER[a]
        index.append(slice(n - 1 - r[-1], n - r[0]) if towards_first else slice(r[0], r[-1] + 1))
        centre.append((index[-1].start + index[-1].stop - 1) / 2)
    data[tuple(index)] = 1000.0
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return (affine @ np.array([*centre, 1.0]))[:3]


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_reading_puts_the_marker_at_superior_anterior_right_and_spacing_in_dhw(orientation: str, tmp_path: Path) -> None:
    _write_marked_ct(tmp_path / "ct.nii.gz", orientation)
    volume, spacing = image_to_volume(read_ct(tmp_path / "ct.nii.gz"))
    assert tuple(volume.shape) == (1, SIZE_SI, SIZE_AP, SIZE_RL)
    assert spacing == pytest.approx((SPACING_SI, SPACING_AP, SPACING_RL))
    expected = torch.full((SIZE_SI, SIZE_AP, SIZE_RL), -1000.0)
    expected[2:4, 2:6, 3:7] = 1000.0
    assert torch.equal(volume[0], expected)


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_preprocessing_at_the_native_spacing_keeps_every_voxel(orientation: str, tmp_path: Path) -> None:
    # spacings exact in binary: 0.7 mm would make TorchIO's Resample floor 20 * 0.7 / 0.7 to 19 voxels
    exact = {"SI": 2.5, "AP": 1.25, "RL": 0.75}
    _write_marked_ct(tmp_path / "ct.nii.gz", orientation, exact)
    pre = Preprocessor(shape=(SIZE_SI, SIZE_AP, SIZE_RL), spacing=(2.5, 1.25, 0.75), window=HUWindow(-500, 500))
    volume, spacing = image_to_volume(pre(read_ct(tmp_path / "ct.nii.gz")))
    assert spacing == pytest.approx((2.5, 1.25, 0.75))
    expected = torch.full((SIZE_SI, SIZE_AP, SIZE_RL), -500.0)  # clipped to the window
    expected[2:4, 2:6, 3:7] = 500.0
    torch.testing.assert_close(volume[0], expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_resampling_to_another_anisotropic_spacing_moves_the_marker_by_physics(orientation: str, tmp_path: Path) -> None:
    world = _write_marked_ct(tmp_path / "ct.nii.gz", orientation)
    # double the in-plane spacings, keep the slices: 30 x 14.4 x 14 mm -> about 12 x 8 x 10 voxels
    image = Preprocessor(shape=(12, 8, 10), spacing=(2.5, 1.8, 1.4))(read_ct(tmp_path / "ct.nii.gz"))
    volume, spacing = image_to_volume(image)
    assert tuple(volume.shape) == (1, 12, 8, 10) and spacing == pytest.approx((2.5, 1.8, 1.4))
    # where the marker's centre must be: its world position in the output grid's voxel units (LPI, i.e. W, H, D)
    w, h, d = (np.linalg.inv(image.affine) @ np.append(world, 1.0))[:3]
    assert 2 < d < 3 and 1 < h < 3 and 1 < w < 4  # superior, anterior and right part of the volume
    weight = (volume[0] + 1000).clamp_min(0)  # bone-weighted centroid
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (12, 8, 10)), indexing="ij")
    centroid = [float((g * weight).sum() / weight.sum()) for g in grids]
    assert centroid == pytest.approx([d, h, w], abs=0.1)
