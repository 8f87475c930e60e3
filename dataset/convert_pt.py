"""``python -m dataset.convert_pt --ct-dir CT --xray-dir XRAY --out OUT``: seed ``.pt`` layout -> prepared dataset.

Input (the layout of the seed systems)::

    CT/<id>.pt              one CT tensor per subject, (D, H, W) or (1, D, H, W)
                            (or {"ct": tensor, "spacing": [sd, sh, sw]}; NIfTI / DICOM folders also work)
    XRAY/<id>/AP.pt         frontal X-ray, (H, W) or (1, H, W)
    XRAY/<id>/LAT.pt        lateral X-ray, same size as AP

Output: the prepared-dataset layout that training reads (see ``dataset.prepare``)::

    OUT/manifest.csv  OUT/dataset.json  OUT/ct/<id>.nii.gz (HU, int16)  OUT/xray/<id>/{AP,LAT}.pt

The user's X-rays are kept (no DRRs are rendered): reoriented with ``--ap-ops`` / ``--lat-ops``,
normalised to [0, 1] (``--xray-norm``, ``--xray-invert``), resized to ``--xray-size`` if asked, and
saved as float32 ``(1, rows, cols)``. Expected orientation (what our DRRs look like)::

    AP : rows superior -> inferior, columns patient right -> left (patient's right on the viewer's left)
    LAT: rows superior -> inferior, columns anterior -> posterior (the patient faces the image's left)
    brighter = more attenuation (bone white, air black)

``--preview PNG`` saves the first converted pair with R/L/A/P/S labels to check this.

CT values: ``--ct-range hu`` (default) for tensors in Hounsfield units; ``unit:LO,HI`` for tensors
already mapped to [-1, 1] from the HU window [LO, HI] (seed 000 style); ``unit01:LO,HI`` for [0, 1].
A tensor stores no spacing, so ``--spacing`` gives it (mm, along the stored axes); ``--ct-axes`` /
``--ct-flip`` fix tensors stored in another axis order. The volume is resampled / cropped only when
``--size`` or ``--target-spacing`` ask for it (cropping narrows the field of view the X-rays show).

DRR geometry goes into ``dataset.json`` only when given (``--geometry-from`` a dataset.json, or
``--sdd --sid --pixel-spacing``). Without it, X-ray re-projection metrics are skipped and the
X-ray conditioning cannot place X-ray features along the true cone-beam rays (back-projection has
to use parallel-beam grids; ``DatasetInfo.geometry`` is None). Subjects that fail are reported and the rest go on; finished
subjects are skipped on a rerun with the same settings. Exit code 0 when at least one subject is
ready, 2 for bad arguments or when every subject fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchio as tio

from dataset.dataset_info import FILE_NAME, DatasetInfo
from dataset.drr import DRRGeometry
from dataset.intensity import HUWindow
from dataset.cli import OneLineParser, number, run_cli
from dataset.io import atomic_save_torch, check_ct, read_ct, write_nifti
from dataset.prepare import (PrepareSummary, _triple_arg, find_cts, read_labels, subject_paths, world_frame_image,
                             world_frame_info, write_prepared_dataset)
from dataset.preprocess import Preprocessor
from dataset.radiograph import XRAY_OPS, apply_ops, read_radiograph, read_xray
from dataset.volume import image_to_volume, volume_to_image

XRAY_ORIENTATION = ("AP: rows superior->inferior, columns patient right->left; "
                    "LAT: rows superior->inferior, columns anterior->posterior; brighter = more attenuation")


@dataclass(frozen=True)
class CTRange:
    """What the values of an input CT tensor mean.

    Args:
        kind: ``"hu"`` (Hounsfield units), ``"unit"`` ([-1, 1] from ``window``) or ``"unit01"``
            ([0, 1] from ``window``).
        window: the HU window the tensor was normalised with (unused for ``"hu"``).
    """

    kind: str = "hu"
    window: HUWindow = HUWindow()

    @classmethod
    def parse(cls, text: str) -> "CTRange":
        """Parse ``hu``, ``unit:LO,HI`` or ``unit01:LO,HI``."""
        kind, _, rest = text.partition(":")
        if kind == "hu" and not rest:
            return cls()
        if kind in ("unit", "unit01") and rest:
            try:
                lo, hi = (float(v) for v in rest.split(","))
                return cls(kind, HUWindow(lo, hi))
            except ValueError:
                pass
        raise ValueError(f"--ct-range {text!r} is invalid; expected 'hu', 'unit:LO,HI' or 'unit01:LO,HI' "
                         "(LO < HI in HU)")

    def __str__(self) -> str:
        return "hu" if self.kind == "hu" else f"{self.kind}:{self.window.hu_min:g},{self.window.hu_max:g}"

    def to_hu(self, values: torch.Tensor, source: str) -> torch.Tensor:
        """Map a tensor of this range to float32 HU; raises ``ValueError`` naming ``source`` when out of range."""
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            raise ValueError(f"{source}: {int((~finite).sum())} voxels are NaN or Inf; expected finite values")
        if self.kind == "hu":
            return values.to(torch.float32)
        lo, hi = (-1.0, 1.0) if self.kind == "unit" else (0.0, 1.0)
        vmin, vmax = float(values.min()), float(values.max())
        tol = 1e-3 * (hi - lo)
        if vmin < lo - tol or vmax > hi + tol:
            raise ValueError(f"{source}: values lie in [{vmin:.4g}, {vmax:.4g}]; expected [{lo:g}, {hi:g}] "
                             f"for --ct-range {self}")
        unit = values if self.kind == "unit" else 2.0 * values - 1.0
        return self.window.to_hu(unit)


@dataclass(frozen=True)
class XrayImport:
    """How the user's X-rays become ours: orientation ops, [0, 1] normalisation, size.

    Args:
        ap_ops, lat_ops: ops applied in order to each view (``transpose``, ``flip-rows``, ``flip-cols``).
        norm: ``"minmax"`` (per image), ``"clip"`` (already in [0, 1]) or ``"range:LO,HI"`` (fixed map).
        invert: flip the grey scale (for images where air is bright).
        size: output ``(rows, cols)``; None keeps the size (bilinear, anti-aliased resize otherwise).
    """

    ap_ops: tuple[str, ...] = ()
    lat_ops: tuple[str, ...] = ()
    norm: str = "minmax"
    invert: bool = False
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for op in self.ap_ops + self.lat_ops:
            if op not in XRAY_OPS:
                raise ValueError(f"X-ray op {op!r} is invalid; expected one of {XRAY_OPS}")
        self.norm_range()  # validates
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 2):
            raise ValueError(f"--xray-size {self.size} is invalid; expected rows cols >= 2")

    def norm_range(self) -> tuple[float, float] | None:
        """``(LO, HI)`` of a ``range:`` norm, else None."""
        if self.norm in ("minmax", "clip"):
            return None
        kind, _, rest = self.norm.partition(":")
        try:
            lo, hi = (float(v) for v in rest.split(","))
        except ValueError:
            lo = hi = 0.0
        if kind != "range" or not hi > lo:
            raise ValueError(f"--xray-norm {self.norm!r} is invalid; expected 'minmax', 'clip' or 'range:LO,HI' (LO < HI)")
        return lo, hi

    def to_dict(self) -> dict:
        """Plain dict for dataset.json."""
        return {"ap_ops": list(self.ap_ops), "lat_ops": list(self.lat_ops), "norm": self.norm,
                "invert": self.invert, "size": list(self.size) if self.size else None,
                "orientation": XRAY_ORIENTATION}

    def orient(self, xray: torch.Tensor, view: str) -> torch.Tensor:
        """Apply the view's ops to ``(1, H, W)``."""
        return apply_ops(xray, self.ap_ops if view == "AP" else self.lat_ops)

    def normalise(self, xray: torch.Tensor, source: str) -> torch.Tensor:
        """``(1, H, W)`` -> [0, 1] (then inverted if asked); raises ``ValueError`` naming ``source``."""
        lo_hi = self.norm_range()
        vmin, vmax = float(xray.min()), float(xray.max())
        if self.norm == "minmax":
            if vmax - vmin <= 0:
                raise ValueError(f"{source}: every pixel equals {vmin:g}; expected an X-ray with contrast")
            x = (xray - vmin) / (vmax - vmin)
        elif self.norm == "clip":
            if vmin < -0.01 or vmax > 1.01:
                raise ValueError(f"{source}: values lie in [{vmin:.4g}, {vmax:.4g}]; expected [0, 1] for "
                                 "--xray-norm clip (use minmax or range:LO,HI)")
            x = xray.clamp(0.0, 1.0)
        else:
            lo, hi = lo_hi
            x = ((xray - lo) / (hi - lo)).clamp(0.0, 1.0)
        return 1.0 - x if self.invert else x

    def resize(self, xray: torch.Tensor) -> torch.Tensor:
        """Resize ``(1, H, W)`` to :attr:`size` (no-op when equal or None)."""
        if self.size is None or tuple(xray.shape[-2:]) == tuple(self.size):
            return xray
        out = F.interpolate(xray[None], size=tuple(self.size), mode="bilinear", align_corners=False, antialias=True)
        return out[0].clamp(0.0, 1.0)

    def __call__(self, ap_path: Path, lat_path: Path, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Load, orient, check sizes, normalise and resize one pair -> two float32 ``(1, rows, cols)``."""
        ap = self.orient(read_xray(ap_path), "AP")  # values as stored: normalise() maps them
        lat = self.orient(read_xray(lat_path), "LAT")
        if ap.shape != lat.shape:
            raise ValueError(f"subject {subject}: AP is {tuple(ap.shape[-2:])} but LAT is {tuple(lat.shape[-2:])} "
                             f"pixels ({ap_path}, {lat_path}); expected both views the same size")
        ap, lat = self.normalise(ap, str(ap_path)), self.normalise(lat, str(lat_path))
        return self.resize(ap).contiguous(), self.resize(lat).contiguous()


def reorder_ct(image: tio.ScalarImage, axes: str = "DHW", flip: str = "") -> tio.ScalarImage:
    """Reinterpret a tensor CT stored in another axis order: ``axes[i]`` names stored axis ``i``.

    Args:
        image: as read from a ``.pt`` file (stored axes taken as ``(D, H, W)``).
        axes: permutation of ``"DHW"``, e.g. ``"WHD"`` when the tensor is ``(W, H, D)``.
        flip: letters of our axes to reverse afterwards (``"D"``: the tensor runs inferior -> superior).
    """
    if sorted(axes) != sorted("DHW"):
        raise ValueError(f"--ct-axes {axes!r} is invalid; expected a permutation of 'DHW'")
    if set(flip) - set("DHW") or len(set(flip)) != len(flip):
        raise ValueError(f"--ct-flip {flip!r} is invalid; expected letters from 'DHW'")
    if axes == "DHW" and not flip:
        return image
    volume, spacing = image_to_volume(image)
    perm = [axes.index(a) for a in "DHW"]
    volume = volume.permute(0, *(p + 1 for p in perm))
    spacing = tuple(spacing[p] for p in perm)
    if flip:
        volume = volume.flip([1 + "DHW".index(a) for a in flip])
    return volume_to_image(volume.contiguous(), spacing)


def xray_subjects(xray_dir: Path) -> list[str]:
    """Ids of the subfolders of ``xray_dir`` holding an ``AP.pt`` or ``LAT.pt``."""
    return sorted(p.name for p in xray_dir.iterdir() if p.is_dir() and ((p / "AP.pt").exists() or (p / "LAT.pt").exists()))


def convert_pt_dataset(ct_dir: str | Path, xray_dir: str | Path, out: str | Path, spacing=(1.0, 1.0, 1.0),
                       ct_range: CTRange = CTRange(), ct_axes: str = "DHW", ct_flip: str = "",
                       size: tuple[int, int, int] | None = None, target_spacing: tuple | None = None,
                       window: HUWindow | None = None, xray: XrayImport = XrayImport(),
                       geometry: DRRGeometry | None = None, seed: int = 0,
                       fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), labels: dict[str, int] | None = None,
                       progress: bool = True) -> PrepareSummary:
    """Convert the seed ``.pt`` layout into a prepared dataset (layout in the module docstring).

    Args:
        ct_dir: ``<id>.pt`` CT tensors (or NIfTI files / DICOM folders).
        xray_dir: ``<id>/AP.pt`` and ``<id>/LAT.pt``.
        out: output folder (an earlier run with the same settings is resumed).
        spacing: mm along the stored tensor axes, for tensors without their own.
        ct_range: what the CT values mean.
        ct_axes, ct_flip: see :func:`reorder_ct` (``.pt`` tensors only).
        size: output CT shape ``(D, H, W)``; None keeps the first readable CT's shape (or the resumed one).
        target_spacing: output spacing ``(D, H, W)`` mm; None keeps ``spacing`` (after ``ct_axes``).
        window: HU window of the dataset; default the ``ct_range`` window, or [-1000, 1000].
        xray: X-ray import settings; its size defaults to the geometry's detector or the first pair's size.
        geometry: DRR geometry of the X-rays, stored in dataset.json only when given.
        seed, fractions, labels: split seed, ``(train, val, test)`` fractions, integer labels per id.
        progress: show a tqdm bar.

    Returns:
        The summary; subjects with a CT but no X-rays (or the reverse) are listed as failed.

    Raises:
        FileNotFoundError: ``ct_dir`` or ``xray_dir`` is missing.
        ValueError: bad settings, no CT found, no CT readable, or ``out`` prepared with other settings.
    """
    ct_dir, xray_dir, out = Path(ct_dir), Path(xray_dir), Path(out)
    if not xray_dir.is_dir():
        raise FileNotFoundError(f"{xray_dir}: no such folder; expected <id>/AP.pt and <id>/LAT.pt inside")
    cts = dict(find_cts(ct_dir))
    ids = sorted(set(cts) | set(xray_subjects(xray_dir)))
    window = window or (ct_range.window if ct_range.kind != "hu" else HUWindow())
    reorder = lambda im, p: reorder_ct(im, ct_axes, ct_flip) if p.suffix == ".pt" else im  # noqa: E731
    resumed = DatasetInfo.load(out) if (out / FILE_NAME).is_file() else None

    def load_ct(sid: str) -> tio.ScalarImage:
        path = cts.get(sid)
        if path is None:
            raise FileNotFoundError(f"no CT for subject {sid} in {ct_dir}; expected {ct_dir / (sid + '.pt')}")
        image = reorder(read_ct(path, pt_spacing=tuple(spacing), check=False), path)
        image = tio.ScalarImage(tensor=ct_range.to_hu(image.data, str(path)), affine=image.affine)
        try:
            check_ct(image, path)
        except ValueError as e:
            hint = " (pass --ct-range unit:LO,HI for tensors normalised from a HU window)" if "normalised" in str(e) else ""
            raise ValueError(f"{e}{hint}") from e
        return image

    if geometry is not None:
        if xray.size is not None and tuple(xray.size) != geometry.detector_size:
            raise ValueError(f"--xray-size {tuple(xray.size)} differs from the geometry's detector size "
                             f"{geometry.detector_size}; expected them equal (or give only one)")
        xray = XrayImport(xray.ap_ops, xray.lat_ops, xray.norm, xray.invert, geometry.detector_size)
    first_error = None
    if size is None or target_spacing is None or xray.size is None:
        # shapes nobody asked for come from the run being resumed, else from the first readable subject
        if resumed is not None:
            size = size or resumed.shape
            target_spacing = target_spacing or resumed.spacing
            if xray.size is None and resumed.extra.get("xray", {}).get("size"):
                xray = XrayImport(xray.ap_ops, xray.lat_ops, xray.norm, xray.invert,
                                  tuple(resumed.extra["xray"]["size"]))
        for sid in ids:
            if size is not None and target_spacing is not None and xray.size is not None:
                break
            try:
                if size is None or target_spacing is None:
                    volume, sp = image_to_volume(load_ct(sid))
                    size, target_spacing = size or tuple(volume.shape[1:]), target_spacing or sp
                if xray.size is None:
                    ap, _ = xray(xray_dir / sid / "AP.pt", xray_dir / sid / "LAT.pt", sid)
                    xray = XrayImport(xray.ap_ops, xray.lat_ops, xray.norm, xray.invert, tuple(ap.shape[-2:]))
            except (ValueError, FileNotFoundError) as e:
                first_error = first_error or e
        if size is None or xray.size is None:
            raise ValueError(f"{ct_dir}, {xray_dir}: no subject could be read, so the output sizes are unknown "
                             f"(first problem: {first_error})")
    preprocessor = Preprocessor(shape=tuple(size), spacing=tuple(target_spacing), window=window)
    info = DatasetInfo(window=window, spacing=preprocessor.spacing, shape=preprocessor.shape, geometry=geometry,
                       split_seed=seed,
                       extra={"preprocess": preprocessor.to_dict(), "split_fractions": list(fractions),
                              "converted_from": {"ct_dir": str(ct_dir.resolve()), "xray_dir": str(xray_dir.resolve()),
                                                 "ct_range": str(ct_range), "ct_axes": ct_axes, "ct_flip": ct_flip,
                                                 "pt_spacing": list(map(float, spacing))},
                              "xray": xray.to_dict(), "world_frame": world_frame_info(),
                              **({} if geometry is not None else {"xray_geometry": "unknown (imported X-rays): DRR "
                                  "re-projection metrics are skipped; back-projection conditioning must use "
                                  "parallel-beam grids"})})

    def write(sid: str, paths: dict[str, Path]) -> dict:
        if sid not in cts:
            load_ct(sid)  # raises the "no CT" error before the X-rays are looked at
        ap, lat = xray(xray_dir / sid / "AP.pt", xray_dir / sid / "LAT.pt", sid)
        pre = preprocessor(load_ct(sid))
        pre, centre = world_frame_image(tio.ScalarImage(tensor=pre.data.round(), affine=pre.affine))
        atomic_save_torch(ap, paths["ap"])
        atomic_save_torch(lat, paths["lat"])
        write_nifti(pre, paths["ct"], dtype=torch.int16)
        return {"scanner_centre_ras_mm": centre}

    return write_prepared_dataset(ids, out, info, write, fractions, labels, progress, desc="convert")


def _pair(text: str) -> tuple[float, float]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI")
    return float(parts[0]), float(parts[1])


def build_parser() -> OneLineParser:
    """The ``dataset.convert_pt`` argument parser."""
    p = OneLineParser(prog="python -m dataset.convert_pt", description=__doc__.split("\n")[0],
                      epilog=f"Expected X-ray orientation: {XRAY_ORIENTATION}.")
    p.add_argument("--ct-dir", type=Path, required=True, help="folder of <id>.pt CT tensors")
    p.add_argument("--xray-dir", type=Path, required=True, help="folder of <id>/AP.pt and <id>/LAT.pt")
    p.add_argument("--out", type=Path, required=True, help="output folder (prepared-dataset layout)")
    p.add_argument("--spacing", type=number(float, min=0, min_open=True), nargs=3, default=[1.0, 1.0, 1.0], metavar=("SD", "SH", "SW"),
                   help="mm along the stored tensor axes (tensors carry no spacing); default 1 1 1")
    p.add_argument("--ct-range", default="hu",
                   help="CT tensor values: hu (default), unit:LO,HI ([-1,1] from HU window LO..HI) or unit01:LO,HI")
    p.add_argument("--ct-axes", default="DHW", help="what the stored tensor axes are, e.g. WHD; default DHW "
                   "(D superior->inferior, H anterior->posterior, W patient right->left)")
    p.add_argument("--ct-flip", default="", help="our axes to reverse after --ct-axes, e.g. D")
    p.add_argument("--size", type=number(int, min=1), nargs="+", default=None, help="output CT shape D H W (or one); default keep")
    p.add_argument("--target-spacing", type=number(float, min=0, min_open=True), nargs="+", default=None,
                   help="output spacing mm D H W (or one); default keep --spacing")
    p.add_argument("--hu-min", type=number(float), default=None, help="dataset HU window low end; default from --ct-range or -1000")
    p.add_argument("--hu-max", type=number(float), default=None, help="dataset HU window high end; default from --ct-range or 1000")
    p.add_argument("--xray-size", type=number(int, min=2), nargs="+", default=None, help="resize X-rays to ROWS [COLS]; default keep")
    p.add_argument("--xray-norm", default="minmax",
                   help="to [0,1]: minmax (per image, default), clip (already [0,1]) or range:LO,HI (fixed)")
    p.add_argument("--xray-invert", action="store_true", help="invert the grey scale (images where air is bright)")
    p.add_argument("--ap-ops", nargs="*", default=[], choices=XRAY_OPS, help="applied in order to AP images")
    p.add_argument("--lat-ops", nargs="*", default=[], choices=XRAY_OPS, help="applied in order to LAT images")
    p.add_argument("--geometry-from", type=Path, default=None,
                   help="dataset.json (or its folder) whose DRR geometry the X-rays follow")
    p.add_argument("--sdd", type=number(float, min=0, min_open=True), default=None, help="source-to-detector distance mm (with --sid, --pixel-spacing)")
    p.add_argument("--sid", type=number(float, min=0, min_open=True), default=None, help="source-to-isocentre distance mm")
    p.add_argument("--pixel-spacing", type=number(float, min=0, min_open=True), default=None, help="detector pixel pitch mm")
    p.add_argument("--wet-scale", type=number(float, min=0, min_open=True), default=250.0, help="DRR contrast of the geometry (see dataset.drr)")
    p.add_argument("--seed", type=number(int, min=0), default=0, help="split seed")
    p.add_argument("--split", type=number(float, min=0), nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--labels", type=Path, default=None, help="CSV subject_id,label (default label 0)")
    p.add_argument("--preview", type=Path, default=None, help="PNG of the first subject's AP/LAT with orientation labels")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _geometry(args: argparse.Namespace, xray_size: tuple[int, int] | None) -> DRRGeometry | None:
    trio = (args.sdd, args.sid, args.pixel_spacing)
    if args.geometry_from is not None:
        if any(v is not None for v in trio):
            raise ValueError("give either --geometry-from or --sdd/--sid/--pixel-spacing, not both")
        geometry = DatasetInfo.load(args.geometry_from).geometry
        if geometry is None:
            raise ValueError(f"{args.geometry_from}: holds no DRR geometry; expected a dataset.json from dataset.prepare")
        return geometry
    if all(v is None for v in trio):
        return None
    if any(v is None for v in trio) or xray_size is None:
        raise ValueError("a geometry needs --sdd, --sid, --pixel-spacing and --xray-size together")
    return DRRGeometry.uniform(args.sdd, args.sid, xray_size, args.pixel_spacing, args.wet_scale)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int | None:
        if (args.hu_min is None) != (args.hu_max is None):
            raise ValueError(f"--hu-min {args.hu_min} / --hu-max {args.hu_max}: give both or neither")
        xray_size = None
        if args.xray_size is not None:
            if len(args.xray_size) not in (1, 2):
                raise ValueError(f"--xray-size takes ROWS [COLS], got {len(args.xray_size)} values")
            xray_size = tuple(args.xray_size) * (3 - len(args.xray_size))
        xray = XrayImport(tuple(args.ap_ops), tuple(args.lat_ops), args.xray_norm, args.xray_invert, xray_size)
        summary = convert_pt_dataset(
            args.ct_dir, args.xray_dir, args.out, spacing=tuple(args.spacing), ct_range=CTRange.parse(args.ct_range),
            ct_axes=args.ct_axes, ct_flip=args.ct_flip,
            size=_triple_arg(args.size, "size") if args.size else None,
            target_spacing=_triple_arg(args.target_spacing, "target-spacing") if args.target_spacing else None,
            window=HUWindow(args.hu_min, args.hu_max) if args.hu_min is not None else None, xray=xray,
            geometry=_geometry(args, xray_size), seed=args.seed, fractions=tuple(args.split),
            labels=read_labels(args.labels) if args.labels is not None else None, progress=not args.no_progress)
        if summary.report(parser.prog):
            return 2
        if args.preview is not None:
            from dataset.drr_figure import save_drr_figure

            sid = (summary.prepared + summary.skipped)[0]
            paths = subject_paths(args.out, sid)
            save_drr_figure(read_radiograph(paths["ap"]).image, read_radiograph(paths["lat"]).image, args.preview,
                            title=f"{sid}: {XRAY_ORIENTATION}")
            print(f"preview: {args.preview}")
        return 0

    return run_cli(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
