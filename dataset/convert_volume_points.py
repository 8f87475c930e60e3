"""``python -m dataset.convert_volume_points --input gen.nii.gz --out points.csv --threshold 300``: volume -> point CSV.

Keeps every voxel whose value is ``>= --threshold`` and writes one CSV row per voxel::

    x,y,z,value      the voxel centre in mm, world coordinates from the image affine
                     (NIfTI RAS+: +x towards the patient's right, +y anterior, +z superior)

``--values`` says what the stored values are,
and so in which units ``--threshold`` is read:

- ``hu`` (default): Hounsfield units, as our generated NIfTIs hold (``--threshold 300`` keeps bone);
- ``unit``: the network range [-1, 1]; ``--window LO,HI`` (default -1000,1000) is only used to report
  the HU the threshold corresponds to;
- ``raw``: any other scale (e.g. ``dataset.convert_h5_points`` volumes in [0, 1], whose affine maps
  back to the cloud's own coordinates, so x y z come out in those units); no range checks.

``value`` is the stored voxel value. Input: ``.nii`` / ``.nii.gz`` or a ``.pt`` tensor ``(D, H, W)`` /
``(1, D, H, W)`` in our layout (``--spacing`` gives its voxel size; its world frame is centred on the
volume). The CSV is written atomically; bad input (missing / corrupt file, wrong shape, NaN, no voxel
above the threshold) gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchio as tio

from dataset.intensity import HUWindow
from dataset.io import atomic_write_text, read_ct
from dataset.cli import OneLineParser, number, run_cli

VALUE_KINDS = ("hu", "unit", "raw")
COLUMNS = ("x", "y", "z", "value")


def volume_to_points(image: tio.ScalarImage, threshold: float, max_points: int | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """Voxels of a one-channel image with value ``>= threshold`` as world points.

    Args:
        image: one-channel image, data ``(1, I, J, K)``.
        threshold: in the image's stored units.
        max_points: keep a seeded random subset of at most this many points.
        seed: subset seed.

    Returns:
        DataFrame ``x, y, z, value``: voxel centres mapped through ``image.affine`` (mm, RAS+ world)
        and the voxel values; rows in voxel order (``i`` slowest).
    """
    data = image.data[0]
    mask = data >= threshold
    ijk = mask.nonzero().to(torch.float64).numpy()  # (n, 3) voxel indices
    values = data[mask].numpy()
    if max_points is not None and len(values) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(values), size=max_points, replace=False))
        ijk, values = ijk[keep], values[keep]
    affine = np.asarray(image.affine, dtype=np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return pd.DataFrame({"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "value": values})


def volume_to_point_csv(path: str | Path, out: str | Path, threshold: float, values: str = "hu",
                          window: HUWindow = HUWindow(), spacing=(1.0, 1.0, 1.0), max_points: int | None = None,
                          seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Read a volume, threshold it and write the point CSV atomically.

    Args:
        path: ``.nii`` / ``.nii.gz`` / ``.pt`` volume.
        out: destination ``.csv``.
        threshold: in the units ``values`` names.
        values: ``"hu"``, ``"unit"`` or ``"raw"`` (module docstring).
        window: HU window of ``unit`` volumes (for the report only).
        spacing: mm along ``(D, H, W)`` for ``.pt`` tensors.
        max_points, seed: see :func:`volume_to_points`.

    Returns:
        The points and a one-line description of what was kept.

    Raises:
        FileNotFoundError: ``path`` is missing.
        ValueError: unreadable or non-3-D volume, NaN / Inf voxels, values that do not fit ``values``,
            or no voxel at or above ``threshold``; nothing is written then.
    """
    path, out = Path(path), Path(out)
    if values not in VALUE_KINDS:
        raise ValueError(f"values={values!r} is invalid; expected one of {VALUE_KINDS}")
    if out.suffix != ".csv":
        raise ValueError(f"{out}: expected a .csv output file")
    if max_points is not None and max_points < 1:
        raise ValueError(f"max_points={max_points}; expected a positive count")
    image = read_ct(path, pt_spacing=tuple(spacing), check=False)
    if image.data.shape[0] != 1:
        raise ValueError(f"{path}: image has {image.data.shape[0]} channels; expected one (a 3-D volume)")
    data = image.data.to(torch.float32)
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        raise ValueError(f"{path}: {int((~finite).sum())} voxels are NaN or Inf; expected finite values")
    lo, hi = float(data.min()), float(data.max())
    if values == "hu" and lo >= -1.5 and hi <= 1.5:
        raise ValueError(f"{path}: values lie in [{lo:.3g}, {hi:.3g}], not Hounsfield units; "
                         "pass --values unit (network range) or --values raw")
    if values == "unit" and (lo < -1.001 or hi > 1.001):
        raise ValueError(f"{path}: values lie in [{lo:.4g}, {hi:.4g}]; expected [-1, 1] for --values unit")
    points = volume_to_points(tio.ScalarImage(tensor=data, affine=image.affine), threshold, max_points, seed)
    if len(points) == 0:
        raise ValueError(f"{path}: no voxel >= {threshold:g} ({values}); the volume spans [{lo:.4g}, {hi:.4g}]")
    unit = {"hu": "HU", "unit": "network units", "raw": "stored units"}[values]
    desc = f"{len(points)} points with value >= {threshold:g} {unit}"
    if values == "unit":
        desc += f" (= {float(window.to_hu(torch.tensor(threshold))):.1f} HU with window [{window.hu_min:g}, {window.hu_max:g}])"
    atomic_write_text(out, points.to_csv(index=False, float_format="%.6g"))
    return points, desc


def _window(text: str) -> HUWindow:
    try:
        lo, hi = (float(v) for v in text.split(","))
        return HUWindow(lo, hi)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI with LO < HI") from e


def build_parser() -> OneLineParser:
    """The ``dataset.convert_volume_points`` argument parser."""
    p = OneLineParser(prog="python -m dataset.convert_volume_points", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, required=True, help="volume: .nii, .nii.gz or .pt (D, H, W)")
    p.add_argument("--out", type=Path, required=True, help="output .csv (columns x,y,z,value; x y z in mm)")
    p.add_argument("--threshold", type=number(float), required=True,
                   help="keep voxels >= this, in the units of --values (HU by default)")
    p.add_argument("--values", choices=VALUE_KINDS, default="hu",
                   help="stored values: hu (default), unit ([-1, 1] network range) or raw (no checks)")
    p.add_argument("--window", type=_window, default=HUWindow(), help="HU window LO,HI of unit volumes (report only)")
    p.add_argument("--spacing", type=number(float, min=0, min_open=True), nargs=3, default=[1.0, 1.0, 1.0], metavar=("SD", "SH", "SW"),
                   help="mm along D H W for .pt tensors; default 1 1 1")
    p.add_argument("--max-points", type=number(int, min=1), default=None, help="keep a seeded random subset of this size")
    p.add_argument("--seed", type=number(int, min=0), default=0, help="subset seed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int | None:
        _, desc = volume_to_point_csv(args.input, args.out, args.threshold, args.values, args.window,
                                        tuple(args.spacing), args.max_points, args.seed)
        print(f"{desc} -> {args.out} (x, y, z: mm, world coordinates from the image affine)")
        return 0

    return run_cli(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
