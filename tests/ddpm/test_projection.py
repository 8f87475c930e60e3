"""Projection geometry on a non-cubic latent grid: which sub-volume sees which X-ray tokens, and what
back-projection puts into each voxel, for parallel-beam and cone-beam grids."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from dataset import DRRGeometry
from ddpm.projection import back_project, footprint_mask, parallel_projection_grids

# latent (D, H, W) = (8, 4, 12) in 4^3 sub-volumes: 2 x 1 x 3 of them; X-ray tokens: 4 rows x 6 columns per view
SHAPE, SUB, TOKENS = (8, 4, 12), 4, (4, 6)
SPACING = (5.0, 9.0, 3.0)  # mm along (D, H, W) of a latent voxel


def _cone_beam_grids() -> tuple[torch.Tensor, torch.Tensor]:
    """Strongly diverging beams (sid only 100 mm), so near and far sub-volumes project differently."""
    geometry = DRRGeometry.fit(SHAPE, SPACING, detector_size=(8, 12), sdd=200.0, sid=100.0)
    return geometry.sample_grid("AP", SHAPE, SPACING), geometry.sample_grid("LAT", SHAPE, SPACING)


def _tokens(rows: list[int], cols: list[int], offset: int = 0) -> set[int]:
    """Row-major token indices of a block of the 4 x 6 token grid (LAT tokens have offset 24)."""
    return {offset + r * TOKENS[1] + c for r in rows for c in cols}


def _seen(mask: torch.Tensor, k: int) -> set[int]:
    return set(torch.nonzero(mask[k]).flatten().tolist())


def test_parallel_footprint_of_every_sub_volume_on_a_non_cubic_grid() -> None:
    grid_ap, grid_lat = parallel_projection_grids(SHAPE)
    mask = footprint_mask(grid_ap, grid_lat, SUB, TOKENS, tokens_per_sub_volume=1)
    assert mask.shape == (6, 48)
    # Sub-volumes are numbered D-major like BiFlowNet's patches: k = (d * 1 + h) * 3 + w.
    # AP rows follow D (sub-volume d covers token rows 2d, 2d+1), AP columns follow W (2w, 2w+1).
    # LAT rows follow D as well; LAT columns follow H: the 4 voxel centres along H fall in token columns
    # 0, 2, 3 and 5 of the 6 (centres at 1/8, 3/8, 5/8, 7/8 of the detector width).
    lat_cols = [0, 2, 3, 5]
    for d in range(2):
        for w in range(3):
            k = d * 3 + w
            expected = _tokens([2 * d, 2 * d + 1], [2 * w, 2 * w + 1]) | _tokens([2 * d, 2 * d + 1], lat_cols, 24)
            assert _seen(mask, k) == expected, k
    # spelled out for two sub-volumes: (d=0, w=1) and (d=1, w=0)
    assert _seen(mask, 1) == {2, 3, 8, 9, 24, 26, 27, 29, 30, 32, 33, 35}
    assert _seen(mask, 3) == {12, 13, 18, 19, 36, 38, 39, 41, 42, 44, 45, 47}


def test_footprint_rows_repeat_for_each_dit_token_of_a_sub_volume() -> None:
    grid_ap, grid_lat = parallel_projection_grids(SHAPE)
    one = footprint_mask(grid_ap, grid_lat, SUB, TOKENS, tokens_per_sub_volume=1)
    eight = footprint_mask(grid_ap, grid_lat, SUB, TOKENS, tokens_per_sub_volume=8)
    assert eight.shape == (48, 48)
    assert torch.equal(eight, one.repeat_interleave(8, dim=0))  # rows 8k..8k+7 belong to sub-volume k


@pytest.mark.parametrize("kind", ["parallel", "cone"])
def test_footprint_equals_the_cells_hit_by_each_patch_of_voxels(kind: str) -> None:
    """Independent oracle: cut the voxel grid into patches exactly as BiFlowNet does (einops, D-major) and
    collect the detector cells (align_corners=False) that each patch's voxel centres project into."""
    grid_ap, grid_lat = parallel_projection_grids(SHAPE) if kind == "parallel" else _cone_beam_grids()
    mask = footprint_mask(grid_ap, grid_lat, SUB, TOKENS, tokens_per_sub_volume=1)
    rows, cols = TOKENS
    for view, (grid, offset) in enumerate(((grid_ap, 0), (grid_lat, rows * cols))):
        patches = rearrange(grid, "(nd sd) (nh sh) (nw sw) two -> (nd nh nw) (sd sh sw) two", sd=SUB, sh=SUB, sw=SUB)
        for k, points in enumerate(patches):
            expected = set()
            for x, y in points.tolist():
                if abs(x) <= 1 and abs(y) <= 1:
                    col = min(int((x + 1) / 2 * cols), cols - 1)
                    row = min(int((y + 1) / 2 * rows), rows - 1)
                    expected.add(offset + row * cols + col)
            half = slice(offset, offset + rows * cols)
            assert set((torch.nonzero(mask[k, half]).flatten() + offset).tolist()) == expected, (view, k)


def test_cone_beam_footprint_follows_position_and_magnification() -> None:
    mask = footprint_mask(*_cone_beam_grids(), SUB, TOKENS, tokens_per_sub_volume=1)
    for k, (d, w) in enumerate((d, w) for d in range(2) for w in range(3)):
        ap = {t for t in _seen(mask, k) if t < 24}
        ap_rows, ap_cols = {t // 6 for t in ap}, {t % 6 for t in ap}
        # superior sub-volumes (d = 0) in the top half of the AP image, inferior ones in the bottom half
        assert ap_rows <= ({0, 1} if d == 0 else {2, 3}), k
        # AP columns run patient right -> left with W: left, middle, right third
        assert min(ap_cols) == [1, 2, 3][w] and max(ap_cols) == [2, 3, 4][w], k
    lat = [{t for t in _seen(mask, k) if t >= 24} for k in range(6)]
    # LAT source on the patient's right (small W): right-hand sub-volumes are magnified most and cover
    # more detector columns than the left-hand ones next to the detector
    assert len(lat[0]) == len(lat[1]) > len(lat[2]) and len(lat[3]) == len(lat[4]) > len(lat[5])
    assert lat[2] < lat[0] and lat[5] < lat[3]


def test_back_projection_puts_each_detector_pixel_on_its_ray() -> None:
    d, h, w = SHAPE
    grid_ap, grid_lat = parallel_projection_grids(SHAPE)
    ap = torch.zeros(1, 1, d, w)  # AP detector at voxel resolution: rows = D, columns = W
    ap[0, 0, 1, 9] = 1.0  # superior, patient left
    lat = torch.zeros(1, 1, d, h)  # LAT detector: rows = D, columns = H
    lat[0, 0, 6, 0] = 1.0  # inferior, anterior
    vol_ap, vol_lat = back_project(ap, grid_ap), back_project(lat, grid_lat)
    assert vol_ap.shape == vol_lat.shape == (1, 1, *SHAPE)
    expected_ap = torch.zeros(SHAPE)
    expected_ap[1, :, 9] = 1.0  # the whole AP ray: every H at (d=1, w=9)
    expected_lat = torch.zeros(SHAPE)
    expected_lat[6, 0, :] = 1.0  # the whole LAT ray: every W at (d=6, h=0)
    torch.testing.assert_close(vol_ap[0, 0], expected_ap, rtol=0, atol=1e-6)
    torch.testing.assert_close(vol_lat[0, 0], expected_lat, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["parallel", "cone"])
def test_back_projecting_detector_coordinates_returns_the_grid(kind: str) -> None:
    """Bilinear sampling reproduces a linear ramp exactly, so back-projecting the detector's own column and
    row coordinates must give every voxel its projected position (x, y) - whatever the grid."""
    grid_ap, grid_lat = parallel_projection_grids(SHAPE) if kind == "parallel" else _cone_beam_grids()
    rows, cols = 64, 96
    y = ((2 * torch.arange(rows) + 1) / rows - 1).reshape(rows, 1).expand(rows, cols)
    x = ((2 * torch.arange(cols) + 1) / cols - 1).reshape(1, cols).expand(rows, cols)
    coords = torch.stack([x, y])[None]  # (1, 2, rows, cols): channel 0 = column position, 1 = row position
    for grid in (grid_ap, grid_lat):
        vol = back_project(coords, grid)  # (1, 2, D, H, W)
        inner = (grid.abs() <= 1 - 1 / rows).all(dim=-1)  # away from the zero padding at the border
        assert inner.float().mean() > 0.5
        torch.testing.assert_close(vol[0, 0][inner], grid[..., 0][inner], rtol=0, atol=1e-5)
        torch.testing.assert_close(vol[0, 1][inner], grid[..., 1][inner], rtol=0, atol=1e-5)
