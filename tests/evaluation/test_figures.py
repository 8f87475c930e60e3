"""MPR figures: pixel size, file writing, content follows the inputs, bad inputs."""

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from dataset.intensity import HUWindow
from evaluation.figures import mpr_figure, save_mpr_figure


def _vol(seed: int, shape=(1, 16, 20, 24)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1).clamp(-1, 1)


def _xray(seed: int) -> torch.Tensor:
    return torch.rand(1, 20, 24, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("with_gt", "with_std", "with_xrays", "rows", "cols"),
    [(True, True, True, 4, 4), (True, False, True, 3, 4), (False, False, False, 1, 3), (False, True, True, 2, 4)],
)
def test_figure_pixel_size(with_gt: bool, with_std: bool, with_xrays: bool, rows: int, cols: int) -> None:
    img = mpr_figure(
        _vol(0),
        _vol(1) if with_gt else None,
        uncertainty=_vol(2).abs() * 0.1 if with_std else None,
        ap=_xray(3) if with_xrays else None,
        lat=_xray(4) if with_xrays else None,
        panel_px=60,
    )
    assert img.dtype == np.uint8
    assert img.shape == (rows * 60, cols * 60, 3)


def test_save_writes_png_of_expected_size_and_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "case.png"
    out = save_mpr_figure(path, _vol(0), _vol(1), ap=_xray(3), lat=_xray(4), window=HUWindow(-1000, 1000), panel_px=64)
    assert out == path and path.is_file()
    png = matplotlib.image.imread(path)
    assert png.shape[:2] == (3 * 64, 4 * 64)
    assert sorted(p.name for p in path.parent.iterdir()) == ["case.png"]  # no temp file left behind
    # the PNG holds exactly the array mpr_figure returns
    arr = mpr_figure(_vol(0), _vol(1), ap=_xray(3), lat=_xray(4), panel_px=64)
    assert np.array_equal((png[..., :3] * 255).round().astype(np.uint8), arr)


def test_content_changes_with_inputs() -> None:
    base = mpr_figure(_vol(0), _vol(1), panel_px=60)
    assert np.array_equal(base, mpr_figure(_vol(0), _vol(1), panel_px=60))  # deterministic
    assert not np.array_equal(base, mpr_figure(_vol(5), _vol(1), panel_px=60))  # other prediction
    assert not np.array_equal(base, mpr_figure(_vol(0), _vol(1), indices=(2, 3, 4), panel_px=60))
    assert not np.array_equal(base, mpr_figure(_vol(0), _vol(1), display_window=(-200, 300), panel_px=60))


def test_planes_are_oriented_as_documented() -> None:
    # A mid-grey block (0 HU) in the superior (small d), anterior (small h), patient-right (small w)
    # octant of a black volume must sit up and left of the black area in all three planes: axial
    # (rows h, cols w), coronal (rows d, cols w), sagittal (rows d, cols h).
    vol = -torch.ones(1, 16, 16, 16)
    vol[:, :8, :8, :8] = 0.0
    img = mpr_figure(vol, indices=(4, 4, 4), panel_px=120).astype(int)
    black = (img < 10).all(axis=2)
    # the three image panels are the three widest runs of columns holding black pixels
    cols = np.flatnonzero(black.sum(axis=0) > 20)
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    panels = sorted(sorted(runs, key=len)[-3:], key=lambda r: r[0])
    for run, plane in zip(panels, ("axial", "coronal", "sagittal")):
        panel = img[:, run[0] : run[-1] + 1]
        grey = (np.abs(panel - 128) < 20).all(axis=2)
        dark = (panel < 10).all(axis=2)
        assert grey.sum() > 300 and dark.sum() > 900, plane
        gy, gx = np.argwhere(grey).mean(axis=0)
        by, bx = np.argwhere(dark).mean(axis=0)
        assert gy < by and gx < bx, plane


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="ground truth volume has shape"):
        mpr_figure(_vol(0), _vol(1, (1, 16, 20, 25)))
    with pytest.raises(ValueError, match="indices"):
        mpr_figure(_vol(0), indices=(16, 0, 0))
    bad = _vol(0)
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="generated volume contains non-finite"):
        mpr_figure(bad)
    with pytest.raises(ValueError, match="negative"):
        mpr_figure(_vol(0), uncertainty=_vol(2))
    with pytest.raises(ValueError, match=".png"):
        save_mpr_figure("/tmp/x.jpg", _vol(0))
