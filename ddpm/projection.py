"""Projection geometry for X-ray conditioning: voxel -> detector grids, footprints, back-projection.

A projection grid has layout (D, H, W, 2): for each latent voxel centre, the detector position in
``F.grid_sample`` convention (x = column, y = row, both in [-1, 1], align_corners=False). Cone-beam
grids come from :func:`dataset.drr.project_points`, the one projection function that DRR rendering,
evaluation and the network share: :func:`projection_grids` for packed per-sample geometries,
:func:`cone_beam_grids` for a prepared dataset's ``dataset.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from dataset.drr import VIEWS, project_points, voxel_centres


def parallel_projection_grids(shape_dhw: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel-beam grids for a volume filling both detectors.

    AP: voxel (d, h, w) -> (x = w, y = d) since AP columns run patient right -> left (W) and rows
    superior -> inferior (D). LAT: voxel (d, h, w) -> (x = h, y = d), columns anterior -> posterior.

    Returns:
        (grid_ap, grid_lat), each (D, H, W, 2) float32 in [-1, 1].
    """
    d, h, w = shape_dhw
    cd = (2 * torch.arange(d) + 1) / d - 1
    ch = (2 * torch.arange(h) + 1) / h - 1
    cw = (2 * torch.arange(w) + 1) / w - 1
    gd, gh, gw = torch.meshgrid(cd, ch, cw, indexing="ij")  # each (D, H, W)
    grid_ap = torch.stack([gw, gd], dim=-1).float()
    grid_lat = torch.stack([gh, gd], dim=-1).float()
    return grid_ap, grid_lat


def projection_grids(
    geometry: torch.Tensor, shape_dhw: tuple[int, int, int], spacing_dhw: tuple[float, float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cone-beam grids of a latent grid for packed pair geometries.

    Args:
        geometry: ``(2, 10)`` or ``(B, 2, 10)`` packed geometry (``DRRGeometry.to_tensor()``), AP row first.
        shape_dhw: latent grid size (D, H, W).
        spacing_dhw: latent voxel spacing in mm (CT spacing times the CT-to-latent factor).

    Returns:
        (grid_ap, grid_lat), each float32 ``(D, H, W, 2)`` (or ``(B, D, H, W, 2)``) on ``geometry``'s
        device; computed in float64 like ``DRRGeometry.sample_grid``, so both agree exactly.
    """
    g = geometry.to(torch.float64)
    points = voxel_centres(tuple(shape_dhw), tuple(spacing_dhw), device=g.device).reshape(-1, 3)  # (N, 3) mm
    lead = g.shape[:-2]
    grids = [project_points(points, view, g[..., i, :]) for i, view in enumerate(VIEWS)]  # each (..., N, 2)
    return tuple(x.reshape(*lead, *shape_dhw, 2).to(torch.float32) for x in grids)  # type: ignore[return-value]


def dataset_geometry(dataset_json: str | Path, latent_shape_dhw: tuple[int, int, int]):
    """The DRR geometry of a prepared dataset and its latent voxel spacing.

    The latent voxel spacing is the CT spacing times the CT-to-latent downsampling factor.

    Returns:
        ``(geometry, latent_spacing)``: a ``dataset.drr.DRRGeometry`` (None when the dataset records
        none, e.g. X-rays imported by ``dataset.convert_pt``) and a ``(D, H, W)`` tuple in mm.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset.json not found (needed for the projection geometry)")
    from dataset.dataset_info import DatasetInfo  # lazy: only callers with a prepared dataset need it

    info = DatasetInfo.load(path)
    spacing = tuple(s * ct / lat for s, ct, lat in zip(info.spacing, info.shape, latent_shape_dhw))
    return info.geometry, spacing


def cone_beam_grids(
    dataset_json: str | Path, latent_shape_dhw: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real projection grids at latent resolution from a prepared dataset's ``dataset.json``.

    Returns:
        (grid_ap, grid_lat), each (D, H, W, 2) float32; the parallel-beam grids when the dataset records
        no geometry (X-rays imported by ``dataset.convert_pt`` without one).
    """
    geometry, spacing = dataset_geometry(dataset_json, latent_shape_dhw)
    if geometry is None:
        return parallel_projection_grids(tuple(latent_shape_dhw))
    return projection_grids(geometry.to_tensor(), tuple(latent_shape_dhw), spacing)


def footprint_mask(
    grid_ap: torch.Tensor,
    grid_lat: torch.Tensor,
    sub_volume: int,
    token_grid_hw: tuple[int, int],
    tokens_per_sub_volume: int,
) -> torch.Tensor:
    """Which X-ray tokens lie under each latent sub-volume's projected footprint.

    Args:
        grid_ap, grid_lat: (D, H, W, 2) projection grids.
        sub_volume: edge of a latent sub-volume in voxels.
        token_grid_hw: X-ray token grid (rows, cols) per view.
        tokens_per_sub_volume: DiT tokens per sub-volume (the mask is repeated for each).

    Returns:
        (n * tokens_per_sub_volume, 2 * rows * cols) bool, AP tokens first; every row has at least one
        True (a sub-volume projecting off both detectors may attend everywhere).
    """
    d, h, w, _ = grid_ap.shape
    rows, cols = token_grid_hw
    nd, nh, nw = d // sub_volume, h // sub_volume, w // sub_volume
    dd, hh, ww = torch.meshgrid(
        torch.arange(d, device=grid_ap.device),
        torch.arange(h, device=grid_ap.device),
        torch.arange(w, device=grid_ap.device),
        indexing="ij",
    )
    sub = ((dd // sub_volume) * nh + hh // sub_volume) * nw + ww // sub_volume  # (D, H, W) sub-volume index
    n_tok = rows * cols
    mask = torch.zeros(nd * nh * nw, 2 * n_tok, dtype=torch.bool, device=grid_ap.device)
    for offset, grid in ((0, grid_ap), (n_tok, grid_lat)):
        x, y = grid[..., 0], grid[..., 1]
        inside = (x.abs() <= 1) & (y.abs() <= 1)
        col = ((x + 1) / 2 * cols).floor().long().clamp(0, cols - 1)
        row = ((y + 1) / 2 * rows).floor().long().clamp(0, rows - 1)
        tok = offset + row * cols + col
        mask[sub[inside], tok[inside]] = True
    mask[~mask.any(dim=1)] = True
    return mask.repeat_interleave(tokens_per_sub_volume, dim=0)


def back_project(feature_map: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Spread 2D detector features along the rays into the volume.

    Args:
        feature_map: (B, C, h, w) features on the detector.
        grid: (D, H, W, 2) projection grid shared by the batch, or (B, D, H, W, 2) one per sample.

    Returns:
        (B, C, D, H, W): each voxel gets the (bilinear) feature at its detector position.
    """
    d, h, w, _ = grid.shape[-4:]
    if grid.ndim == 4:
        grid = grid[None].expand(feature_map.shape[0], -1, -1, -1, -1)
    flat = rearrange(grid, "b d h w two -> b d (h w) two")
    out = F.grid_sample(feature_map, flat.to(feature_map.dtype), mode="bilinear", align_corners=False)  # (B, C, D, H*W)
    return rearrange(out, "b c d (h w) -> b c d h w", h=h, w=w)


__all__ = ["back_project", "cone_beam_grids", "dataset_geometry", "footprint_mask", "parallel_projection_grids",
           "projection_grids"]
