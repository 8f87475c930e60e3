"""``python -m dataset.convert_h5_points --input clouds.h5 --out DIR``: HDF5 point clouds -> voxel NIfTI volumes.

Input: an HDF5 file with a dataset of point clouds ``(N, P, 3)`` (N clouds of P points, x y z).
``--dataset`` names it; by default the file's single 3-column float dataset is used.

Each cloud is fitted into a ``V^3`` grid (``--voxel-size V``): centred on its bounding box, scaled
isotropically so its largest side spans ``V - 1 - 2 * margin`` voxels (``--scale shared`` uses one
box for all clouds, keeping their relative sizes). Then either

- ``occupancy``: voxels holding a point are 1, others 0 (uint8), or
- ``gaussian``: every point adds ``exp(-d^2 / (2 sigma^2))`` (``d`` in voxels, ``--sigma``) to the
  voxels within ``3 sigma``; the sum is divided by its maximum (float32 in [0, 1]).

Output::

    OUT/<prefix>_<index:04d>.nii.gz   one per cloud; voxel axes i, j, k follow x, y, z and the affine
                                      maps voxel indices back to the cloud's own coordinates
    OUT/conversion.json               the settings

Every cloud is checked (finite, not a single point) before anything is written; each file is
written atomically. Existing outputs are refused unless ``--overwrite``. Exit code 0 on success,
2 for bad input (missing / corrupt file, no such dataset, wrong shape, NaN) with one line on stderr.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
import torchio as tio
from tqdm import tqdm

from dataset.io import atomic_write_json, write_nifti
from dataset.cli import OneLineParser, number, run_cli

METHODS = ("occupancy", "gaussian")
SCALES = ("per-cloud", "shared")
_CHUNK = 256  # clouds read from the file at a time


def _grid_span(voxel_size: int, margin: int) -> int:
    span = voxel_size - 1 - 2 * margin
    if voxel_size < 2 or margin < 0 or span <= 0:
        raise ValueError(f"voxel_size={voxel_size}, margin={margin}: expected voxel_size >= 2 and "
                         "0 <= margin < (voxel_size - 1) / 2")
    return span


def voxelize_points(points: torch.Tensor, voxel_size: int, method: str = "occupancy", sigma: float = 1.0,
                    margin: int = 2, bounds: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[torch.Tensor, np.ndarray]:
    """Rasterise one point cloud into a cube.

    Args:
        points: ``(P, 3)`` x y z coordinates (finite).
        voxel_size: grid size ``V`` (a ``V^3`` cube).
        method: ``"occupancy"`` or ``"gaussian"``.
        sigma: Gaussian width in voxels (``gaussian`` only).
        margin: empty voxels kept on each side of the fitted box.
        bounds: ``(low, high)`` box to fit instead of the cloud's own bounding box.

    Returns:
        ``(volume, affine)``: ``(V, V, V)`` indexed ``[i, j, k]`` along x, y, z (uint8 occupancy,
        or float32 in [0, 1]); 4x4 affine from voxel index to point coordinates.

    Raises:
        ValueError: bad method / sigma / sizes, wrong shape, non-finite points, or a zero-size box.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid; expected one of {METHODS}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"sigma={sigma!r} is invalid; expected a positive width in voxels")
    span = _grid_span(voxel_size, margin)
    if points.ndim != 2 or points.shape[-1] != 3 or points.shape[0] == 0:
        raise ValueError(f"points have shape {tuple(points.shape)}; expected (P, 3) with P >= 1")
    pts = points.to(torch.float64)
    if not bool(torch.isfinite(pts).all()):
        raise ValueError(f"{int((~torch.isfinite(pts)).any(-1).sum())} points are NaN or Inf; expected finite coordinates")
    low, high = bounds if bounds is not None else (pts.min(0).values.numpy(), pts.max(0).values.numpy())
    extent = float(np.max(np.asarray(high) - np.asarray(low)))
    if not extent > 0:
        raise ValueError("all points coincide; expected a cloud with a non-zero extent")
    centre = (np.asarray(low, dtype=np.float64) + np.asarray(high, dtype=np.float64)) / 2
    step = extent / span  # point units per voxel
    mid = (voxel_size - 1) / 2
    grid = (pts - torch.from_numpy(centre)) / step + mid  # (P, 3) voxel coordinates
    affine = np.eye(4)
    affine[:3, :3] *= step
    affine[:3, 3] = centre - step * mid
    v = voxel_size
    if method == "occupancy":
        idx = grid.round().long().clamp(0, v - 1)
        volume = torch.zeros(v, v, v, dtype=torch.uint8)
        volume[idx[:, 0], idx[:, 1], idx[:, 2]] = 1
        return volume, affine
    radius = math.ceil(3 * sigma)
    nearest = grid.round().long()
    flat = torch.zeros(v * v * v, dtype=torch.float64)
    r = torch.arange(-radius, radius + 1)
    offsets = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)  # (K, 3)
    chunk = max(1, (1 << 22) // len(offsets))  # points per pass: bounded memory for big clouds / kernels
    for start in range(0, len(grid), chunk):
        g = grid[start:start + chunk, None]  # (p, 1, 3)
        cell = nearest[start:start + chunk, None] + offsets  # (p, K, 3)
        d2 = ((cell - g) ** 2).sum(-1)  # (p, K) squared voxel distance
        keep = ((cell >= 0) & (cell < v)).all(-1) & (d2 <= (3 * sigma) ** 2)
        c = cell[keep]
        flat.index_add_(0, (c[:, 0] * v + c[:, 1]) * v + c[:, 2], torch.exp(-d2[keep] / (2 * sigma**2)))
    volume = flat.reshape(v, v, v)
    return (volume / volume.max()).to(torch.float32), affine


def h5_datasets(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every dataset in an HDF5 file as ``{name: (shape, dtype)}``.

    Raises:
        FileNotFoundError: ``path`` is missing.
        ValueError: ``path`` is not a readable HDF5 file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected an HDF5 file of point clouds (N, P, 3)")
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.__setitem__(name, (tuple(obj.shape), str(obj.dtype)))
                         if isinstance(obj, h5py.Dataset) else None)
    except OSError as e:
        raise ValueError(f"{path}: cannot be read as HDF5 ({e})") from e
    return found


def find_point_dataset(path: Path, name: str | None = None) -> str:
    """The name of the ``(N, P, 3)`` point-cloud dataset in ``path`` (``name`` if given, else the only one).

    Raises:
        ValueError: no such dataset, wrong shape / type, or several candidates; the message names the
            file and lists the datasets it holds.
    """
    found = h5_datasets(path)
    listing = ", ".join(f"{k} {v[0]} {v[1]}" for k, v in sorted(found.items())) or "no datasets"
    if name is not None:
        key = name.strip("/")
        if key not in found:
            raise ValueError(f"{path}: has no dataset {name!r}; it holds {listing}")
        shape, dtype = found[key]
        if len(shape) != 3 or shape[-1] != 3 or 0 in shape or np.dtype(dtype).kind not in "fiu":
            raise ValueError(f"{path}: dataset {key!r} is {shape} {dtype}; expected numeric point clouds (N, P, 3)")
        return key
    candidates = [k for k, (shape, dtype) in found.items()
                  if len(shape) == 3 and shape[-1] == 3 and 0 not in shape and np.dtype(dtype).kind == "f"]
    if len(candidates) != 1:
        what = "no" if not candidates else f"{len(candidates)}"
        raise ValueError(f"{path}: {what} float datasets of shape (N, P, 3); it holds {listing}"
                         + ("; pass --dataset" if candidates else ""))
    return candidates[0]


def _clouds(path: Path, name: str) -> Iterator[tuple[int, np.ndarray]]:
    with h5py.File(path, "r") as f:
        data = f[name]
        for start in range(0, data.shape[0], _CHUNK):
            for i, cloud in enumerate(np.asarray(data[start:start + _CHUNK], dtype=np.float64)):
                yield start + i, cloud


def convert_h5_point_clouds(path: str | Path, out: str | Path, voxel_size: int = 64, method: str = "occupancy",
                      sigma: float = 1.0, margin: int = 2, scale: str = "per-cloud", dataset: str | None = None,
                      prefix: str | None = None, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Convert every cloud of an HDF5 file into a NIfTI volume (layout in the module docstring).

    Args:
        path: the ``.h5`` file.
        out: output folder (created).
        voxel_size, method, sigma, margin: see :func:`voxelize_points`.
        scale: ``"per-cloud"`` (each cloud fills the grid) or ``"shared"`` (one box for all clouds).
        dataset: dataset name; None auto-detects the only ``(N, P, 3)`` float dataset.
        prefix: output file prefix; default the file's stem.
        overwrite: replace existing outputs.
        progress: show a tqdm bar.

    Returns:
        The written NIfTI paths, in cloud order.

    Raises:
        FileNotFoundError / ValueError: see :func:`find_point_dataset`; NaN / Inf points or a
            single-point cloud (naming the cloud index); bad settings; existing outputs without
            ``overwrite``. Nothing is written in these cases.
    """
    path, out = Path(path), Path(out)
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is invalid; expected one of {SCALES}")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid; expected one of {METHODS}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"sigma={sigma!r} is invalid; expected a positive width in voxels")
    _grid_span(voxel_size, margin)
    name = find_point_dataset(path, dataset)
    low = high = None
    n = 0
    for i, cloud in _clouds(path, name):  # check everything before writing anything
        bad = ~np.isfinite(cloud).all(-1)
        if bad.any():
            raise ValueError(f"{path}: dataset {name!r} cloud {i} has {int(bad.sum())} NaN/Inf points; "
                             "expected finite coordinates")
        lo, hi = cloud.min(0), cloud.max(0)
        if scale == "per-cloud" and not (hi - lo).max() > 0:
            raise ValueError(f"{path}: dataset {name!r} cloud {i}: all points coincide; expected a non-zero extent")
        low = lo if low is None else np.minimum(low, lo)
        high = hi if high is None else np.maximum(high, hi)
        n += 1
    if scale == "shared" and not (high - low).max() > 0:
        raise ValueError(f"{path}: dataset {name!r}: all points coincide; expected a non-zero extent")
    prefix = prefix or path.stem
    targets = [out / f"{prefix}_{i:04d}.nii.gz" for i in range(n)]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]}: exists ({len(existing)} outputs do); pass --overwrite or another --out")
    bounds = (low, high) if scale == "shared" else None
    for (i, cloud), target in tqdm(zip(_clouds(path, name), targets), total=n, desc="voxelize", unit="cloud",
                                   disable=not progress):
        volume, affine = voxelize_points(torch.from_numpy(cloud), voxel_size, method, sigma, margin, bounds)
        write_nifti(tio.ScalarImage(tensor=volume[None], affine=affine), target)
    atomic_write_json(out / "conversion.json", {
        "source": str(path.resolve()), "dataset": name, "clouds": n, "voxel_size": voxel_size, "method": method,
        "sigma": sigma if method == "gaussian" else None, "margin": margin, "scale": scale,
        "files": [t.name for t in targets],
        "axes": "voxel i, j, k = point x, y, z; the affine maps voxel indices to the cloud's coordinates"})
    return targets


def build_parser() -> OneLineParser:
    """The ``dataset.convert_h5_points`` argument parser."""
    p = OneLineParser(prog="python -m dataset.convert_h5_points", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, required=True, help="HDF5 file with point clouds (N, P, 3)")
    p.add_argument("--out", type=Path, required=True, help="output folder for <prefix>_<index>.nii.gz")
    p.add_argument("--dataset", default=None, help="dataset name; default: the only (N, P, 3) float dataset")
    p.add_argument("--voxel-size", type=number(int, min=2), default=64, help="grid size V (V^3 voxels); default 64")
    p.add_argument("--method", choices=METHODS, default="occupancy", help="occupancy (0/1) or gaussian splat")
    p.add_argument("--sigma", type=number(float, min=0, min_open=True), default=1.0, help="Gaussian width in voxels (gaussian only); default 1")
    p.add_argument("--margin", type=number(int, min=0), default=2, help="empty voxels on each side; default 2")
    p.add_argument("--scale", choices=SCALES, default="per-cloud",
                   help="per-cloud: each cloud fills the grid (default); shared: one box for all clouds")
    p.add_argument("--prefix", default=None, help="output file prefix; default the input file's stem")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int | None:
        written = convert_h5_point_clouds(args.input, args.out, args.voxel_size, args.method, args.sigma, args.margin,
                                    args.scale, args.dataset, args.prefix, args.overwrite, not args.no_progress)
        print(f"{len(written)} volumes ({args.method}, {args.voxel_size}^3) written to {args.out}")
        return 0

    return run_cli(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
