"""Radiographs in: read an AP + lateral pair, put it on a model's detector grid, match its intensity.

What ``evaluation.generate_ct`` does with each input pair before sampling:

1. :func:`dataset.radiograph.read_radiograph`: DICOM / PNG / JPEG / TIFF / NIfTI / ``.pt`` into the
   display convention, with the view's geometry when the file (or the options) tell it;
2. :func:`dataset.radiograph.to_detector`: onto the model's detector (its rows x cols and its field of
   view at the isocentre; crop / pad, never stretch);
3. harmonisation (``--harmonize auto``, off by default): the intensity matched to the training X-rays' statistics
   stored in the checkpoint (:class:`dataset.xray_harmonization.IntensityReference`).

Every step is listed (:attr:`XrayInputs.steps`): printed to the log, drawn in ``--preview`` and written
to the JSON sidecar next to each output (:func:`sidecar`).
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dataset.cli import number
from dataset.drr import VIEWS, DRRGeometry, ViewGeometry
from dataset.radiograph import XRAY_OPS, Radiograph, read_radiograph, to_detector
from dataset.xray_harmonization import IntensityReference

HARMONIZE = ("auto", "none")


@dataclass(frozen=True)
class XrayOptions:
    """How the user's radiographs are read (the ``generate_ct`` X-ray options).

    Args:
        ap_ops, lat_ops: orientation ops applied after the tag-based orientation.
        pixel_spacing: detector pitch ``(row, col)`` mm for the files of either view that carry none.
        sdd, sid: source-to-detector / source-to-isocentre distances, mm, for the files that carry none.
        harmonize: ``"none"`` (default: as read) or ``"auto"`` (match the training intensity when the checkpoint
            has its statistics).
        views: per-view values that replace the file's: ``{"AP": {"pixel_spacing": (r, c), "sdd": mm, "sid": mm},
            "LAT": {...}}`` (any subset).
    """

    ap_ops: tuple[str, ...] = ()
    lat_ops: tuple[str, ...] = ()
    pixel_spacing: tuple[float, float] | None = None
    sdd: float | None = None
    sid: float | None = None
    harmonize: str = "none"
    views: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.harmonize not in HARMONIZE:
            raise ValueError(f"harmonize={self.harmonize!r} is invalid; expected one of {HARMONIZE}")
        for view, values in self.views.items():
            if view not in VIEWS or not set(values) <= set(PER_VIEW):
                raise ValueError(f"per-view X-ray options {view}: {sorted(values)} are invalid; expected views "
                                 f"{VIEWS} with some of {PER_VIEW}")
        for view in VIEWS:  # the distances that would apply to a file carrying none
            sdd, sid = self.of(view).get("sdd", self.sdd), self.of(view).get("sid", self.sid)
            if sdd is not None and sid is not None and not sdd > sid:
                raise ValueError(f"{view}: SDD {sdd:g} mm must exceed the source-isocentre distance {sid:g} mm "
                                 "(--sdd / --sid and their per-view forms)")

    def of(self, view: str) -> dict:
        """The values given for ``view`` alone (they replace the file's)."""
        return dict(self.views.get(view, {}))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "XrayOptions":
        """From :func:`add_xray_arguments`' options."""
        views: dict = {}
        for view in VIEWS:
            prefix = view.lower()
            given = {"pixel_spacing": _spacing(getattr(args, f"{prefix}_pixel_spacing", None), f"--{prefix}-pixel-spacing"),
                     "sdd": getattr(args, f"{prefix}_sdd", None), "sid": getattr(args, f"{prefix}_sid", None)}
            given = {k: v for k, v in given.items() if v is not None}
            if given:
                views[view] = given
        return cls(tuple(args.ap_ops), tuple(args.lat_ops), _spacing(args.pixel_spacing, "--pixel-spacing"), args.sdd,
                   args.sid, args.harmonize, views)


PER_VIEW = ("pixel_spacing", "sdd", "sid")


def _spacing(values, option: str) -> tuple[float, float] | None:
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise ValueError(f"{option} takes ROW [COL] mm, got {len(values)} values")
    return (values[0], values[-1])


def add_xray_arguments(p: argparse.ArgumentParser) -> None:
    """The X-ray input options of ``generate_ct`` (read back by :meth:`XrayOptions.from_args`)."""
    g = p.add_argument_group("X-ray input (DICOM, PNG/JPEG/TIFF, 2-D NIfTI, .pt)")
    g.add_argument("--ap-ops", nargs="+", default=[], choices=XRAY_OPS, metavar="OP",
                   help=f"orientation fixes for the AP image, applied in order after the DICOM tags ({', '.join(XRAY_OPS)})")
    g.add_argument("--lat-ops", nargs="+", default=[], choices=XRAY_OPS, metavar="OP",
                   help="orientation fixes for the lateral image, as --ap-ops")
    g.add_argument("--pixel-spacing", nargs="+", type=number(float, min=0, min_open=True), default=None,
                   metavar="MM", help="detector pixel pitch ROW [COL] in mm as stored, for the files that carry none "
                   "(PNG/JPEG/TIFF/NIfTI/.pt; a DICOM's own is kept); without it such images are fitted to the "
                   "detector at one scale for both views")
    g.add_argument("--sdd", type=number(float, min=0, min_open=True), default=None, metavar="MM",
                   help="source-to-detector distance for the files that carry none (else the model's)")
    g.add_argument("--sid", type=number(float, min=0, min_open=True), default=None, metavar="MM",
                   help="source-to-isocentre distance for the files that carry none (else from the SDD and the "
                   "model's magnification)")
    for view in ("ap", "lat"):
        g.add_argument(f"--{view}-pixel-spacing", nargs="+", type=number(float, min=0, min_open=True), default=None,
                       metavar="MM", help=f"the {view.upper()} image's pixel pitch ROW [COL] in mm, replacing its own")
        g.add_argument(f"--{view}-sdd", type=number(float, min=0, min_open=True), default=None, metavar="MM",
                       help=f"the {view.upper()} image's source-to-detector distance, replacing its own")
        g.add_argument(f"--{view}-sid", type=number(float, min=0, min_open=True), default=None, metavar="MM",
                       help=f"the {view.upper()} image's source-to-isocentre distance, replacing its own")
    g.add_argument("--harmonize", choices=HARMONIZE, default="none",
                   help="use the input intensity as read (none, default: models trained with the radiograph-style "
                   "augmentation measured best so, see benchmarks/RESULTS.md) or match it to the training X-rays' "
                   "statistics stored in the checkpoint (auto)")
    g.add_argument("--preview", type=Path, default=None, metavar="PNG",
                   help="save the inputs as the model receives them beside the training look, with the steps; "
                   "without --output / --output-dir only the preview is made (no sampling)")


# ------------------------------------------------------------------------------------- model facts
def training_geometry(biflownet) -> DRRGeometry | None:
    """The geometry of a model's training X-rays (the one place inference code asks for it).

    Args:
        biflownet: a ``ddpm.LoadedBiFlowNet``.

    Returns:
        Its ``geometry`` when the loader provides one, else the DRR geometry of the ``dataset.json``
        recorded in its hyper-parameters (None when absent or unreadable).
    """
    geometry = getattr(biflownet, "geometry", None)
    if geometry is not None:
        return geometry
    path = (getattr(biflownet, "hparams", None) or {}).get("dataset_json")
    if not path or not Path(path).is_file():
        return None
    from dataset import DatasetInfo

    try:
        return DatasetInfo.load(path).geometry
    except ValueError:
        return None


def intensity_reference(biflownet) -> IntensityReference | None:
    """The training X-ray intensity statistics stored in a BiFlowNet checkpoint, or None."""
    stats = (getattr(biflownet, "hparams", None) or {}).get("xray_stats")
    return IntensityReference.from_dict(stats) if stats else None


def sample_kwargs(gen, inputs: "XrayInputs") -> dict:
    """Extra keyword arguments of ``CTGenerator.sample`` for this pair.

    The pair's geometry goes to ``sample(..., geometry=...)`` only when the generator takes it
    (networks that place X-ray features along per-sample rays); otherwise the model uses its
    training geometry.
    """
    if inputs.geometry is not None and "geometry" in inspect.signature(gen.sample).parameters:
        return {"geometry": inputs.geometry}
    return {}


# --------------------------------------------------------------------------------------- the pair
@dataclass(frozen=True)
class XrayInputs:
    """An AP + lateral pair as the model receives it.

    Attributes:
        ap, lat: :class:`~dataset.radiograph.Radiograph` on the model's detector grid (``image`` ``(1, H, W)``).
        geometry: the pair's geometry (detector = the model's), or None when the model has none.
        harmonized: whether the intensity was matched to the training statistics.
    """

    ap: Radiograph
    lat: Radiograph
    geometry: DRRGeometry | None
    harmonized: bool = False
    extra_steps: tuple[str, ...] = field(default=())

    @property
    def steps(self) -> list[str]:
        """Every step, prefixed with its view."""
        return [f"{view}: {s}" for view, r in (("AP", self.ap), ("LAT", self.lat)) for s in r.steps] + list(self.extra_steps)

    def to_dict(self) -> dict:
        """The sidecar content: input files, geometry per view, steps, harmonisation."""
        return {"inputs": {"AP": self.ap.path, "LAT": self.lat.path},
                "geometry": self.geometry.to_dict() if self.geometry is not None else None,
                "views": {"AP": self.ap.to_dict(), "LAT": self.lat.to_dict()},
                "harmonization": "matched to the training X-ray statistics" if self.harmonized else "none",
                "steps": self.steps}


def prepare_pair(ap_path: str | os.PathLike, lat_path: str | os.PathLike, xray_size: Sequence[int],
                 model_geometry: DRRGeometry | None, reference: IntensityReference | None,
                 options: XrayOptions = XrayOptions(), known: DRRGeometry | None = None) -> XrayInputs:
    """Read, orient, map and harmonise one pair for a model.

    Args:
        ap_path, lat_path: the radiographs.
        xray_size: the model's detector ``(rows, cols)``.
        model_geometry: the model's training geometry (:func:`training_geometry`), or None (the images
            are then fitted to the detector by pixels).
        reference: training intensity statistics (:func:`intensity_reference`), or None.
        options: the user's X-ray options.
        known: geometry of files that carry none (a prepared dataset's ``dataset.json`` in manifest mode).

    Returns:
        :class:`XrayInputs` whose images have the model's detector size, in [0, 1].
    """
    rows, cols = (int(s) for s in xray_size)
    if Path(ap_path).resolve() == Path(lat_path).resolve():
        raise ValueError(f"{ap_path}: given as both the AP and the lateral X-ray; expected two different views")
    read, model_views = {}, {}
    for view, path, ops in (("AP", ap_path, options.ap_ops), ("LAT", lat_path, options.lat_ops)):
        model_view = model_geometry.view(view) if model_geometry is not None else None
        if model_view is not None and model_view.detector_size != (rows, cols):
            model_view = replace(model_view, detector_size=(rows, cols),
                                 pixel_spacing=tuple(p * n / m for p, n, m in
                                                     zip(model_view.pixel_spacing, model_view.detector_size, (rows, cols))))
        own = options.of(view)
        r = read_radiograph(path, view, ops, pixel_spacing=own.get("pixel_spacing"), sdd=own.get("sdd"),
                            sid=own.get("sid"), assume=model_view or ViewGeometry(),
                            fill_pixel_spacing=options.pixel_spacing, fill_sdd=options.sdd, fill_sid=options.sid)
        given = known.view(view) if known is not None else None
        if r.geometry is None and given is not None and tuple(r.image.shape[1:]) == given.detector_size:
            r = replace(r, geometry=given, reversed=given.reversed,
                        steps=r.steps + (f"geometry of the prepared dataset (dataset.json): {given.detector_size[0]} x "
                                         f"{given.detector_size[1]} at {given.pixel_spacing[0]:.4g} x "
                                         f"{given.pixel_spacing[1]:.4g} mm, SDD {given.sdd:g}, SID {given.sid:g} mm",))
        if model_view is None and r.geometry is not None:
            r = replace(r, geometry=None, steps=r.steps + ("the model records no training geometry: the pixel "
                                                           "spacing cannot be used",))
        read[view], model_views[view] = r, model_view
    if read["AP"].image.shape == read["LAT"].image.shape and torch.equal(read["AP"].image, read["LAT"].image):
        raise ValueError(f"{ap_path} and {lat_path}: the AP and lateral images are identical; expected two "
                         "different views of one patient")
    # two images without a pixel spacing are taken from one detector: one scale fits the larger field of both
    fit = None
    if all(r.geometry is None for r in read.values()):
        fit = max(max(r.image.shape[1] / rows, r.image.shape[2] / cols) for r in read.values())
    views = {}
    for view, r in read.items():
        if model_views[view] is None:
            r = replace(to_detector(r, ViewGeometry(detector_size=(rows, cols)), fit), geometry=None)
        else:
            r = to_detector(r, model_views[view], fit)
        views[view] = r
    harmonized = False
    extra: list[str] = []
    if options.harmonize == "auto":
        if reference is None:
            extra.append("harmonisation: none (the checkpoint stores no training X-ray statistics)")
        else:
            for view in VIEWS:
                r = views[view]
                image, step = reference.match(r.image, view, r.valid)
                views[view] = replace(r, image=image, steps=r.steps + (step,))
            harmonized = True
    else:
        extra.append("harmonisation: none (--harmonize none)")
    geometry = None
    if model_geometry is not None and views["AP"].geometry is not None and views["LAT"].geometry is not None:
        geometry = DRRGeometry(views["AP"].geometry, views["LAT"].geometry, model_geometry.wet_scale_mm)
    return XrayInputs(views["AP"], views["LAT"], geometry, harmonized, tuple(extra))


def manifest_geometries(manifest: str | os.PathLike, frame) -> dict[str, DRRGeometry]:
    """Per-subject geometry of a prepared dataset's X-rays (``dataset.json`` + the manifest's geometry columns)."""
    from dataset import DatasetInfo

    info_path = Path(manifest).parent / "dataset.json"
    if not info_path.is_file():
        return {}
    default = DatasetInfo.load(info_path).geometry
    if default is None:
        return {}
    try:
        return {str(row["subject_id"]): DRRGeometry.from_columns(row, default) for _, row in frame.iterrows()}
    except ValueError as e:
        raise ValueError(f"{manifest}: {e}") from None


def sidecar(output: str | os.PathLike) -> Path:
    """The JSON sidecar of an output NIfTI: ``<name>.json`` beside ``<name>.nii.gz``."""
    output = Path(output)
    name = output.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else output.stem
    return output.with_name(f"{stem}.json")


def check_side_outputs(sidecars: Sequence[Path], preview: Path | None, overwrite: bool) -> None:
    """Refuse existing sidecars / preview (unless ``overwrite``) and a preview name that is not ``.png``, before any work."""
    if preview is not None and preview.suffix.lower() != ".png":
        raise ValueError(f"--preview {preview}: expected a .png file name")
    from dataset.io import check_writable

    for path in [*sidecars, *([preview] if preview is not None else [])]:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists; pass --overwrite to replace it")
        check_writable(path, "preview" if path == preview else "sidecar")


def write_sidecar(output: str | os.PathLike, inputs: XrayInputs, extra: Mapping | None = None) -> Path:
    """Write :meth:`XrayInputs.to_dict` (plus ``extra``) atomically to :func:`sidecar` of ``output``."""
    from dataset.io import atomic_write_json

    path = sidecar(output)
    atomic_write_json(path, {"output": str(output), **inputs.to_dict(), **dict(extra or {})})
    return path


# ------------------------------------------------------------------------------------------ preview
def save_preview(path: str | os.PathLike, inputs: XrayInputs, reference: IntensityReference | None,
                 title: str = "") -> None:
    """PNG: the two inputs as the model receives them beside the mean training X-rays, with the steps listed.

    Args:
        path: PNG to write (atomically).
        inputs: the prepared pair.
        reference: training statistics whose mean images show the training look (None: not shown).
        title: figure title.
    """
    import textwrap

    import matplotlib.image
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dataset.io import atomic_write

    means = {v: (reference.views[v].mean_image if reference is not None else None) for v in VIEWS}
    lines = [textwrap.shorten(s, 150, placeholder=" ...") for s in inputs.steps]
    fig = Figure(figsize=(8.4, 8.0 + 0.16 * len(lines)), dpi=100)
    FigureCanvasAgg(fig)
    top = 8.0 / (8.0 + 0.16 * len(lines))
    gs = fig.add_gridspec(2, 2, left=0.03, right=0.97, top=0.95, bottom=1 - top + 0.02, hspace=0.12, wspace=0.05)
    marks = {"AP": ("S", "R", "L"), "LAT": ("S", "A", "P")}
    for i, view in enumerate(VIEWS):
        r = getattr(inputs, view.lower())
        panels = ((r.image[0].numpy(), f"{view}: input as the model receives it"),
                  (np.asarray(means[view]) if means[view] is not None else None, f"{view}: mean training X-ray"))
        for j, (image, label) in enumerate(panels):
            ax = fig.add_subplot(gs[i, j])
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(label, fontsize=9)
            if image is None:
                ax.text(0.5, 0.5, "not stored in this checkpoint", ha="center", va="center", fontsize=9)
                continue
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            style = {"transform": ax.transAxes, "color": "yellow", "fontsize": 10, "fontweight": "bold"}
            top_mark, left, right = marks[view]
            ax.text(0.5, 0.98, top_mark, ha="center", va="top", **style)
            ax.text(0.02, 0.5, left, ha="left", va="center", **style)
            ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    fig.text(0.03, 1 - top, "\n".join(lines), ha="left", va="top", fontsize=6.5, family="monospace")
    if title:
        fig.suptitle(title, fontsize=10)
    canvas = fig.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    with atomic_write(path, "wb") as f:
        matplotlib.image.imsave(f, rgba[..., :3], format="png")


__all__ = ["HARMONIZE", "XrayInputs", "XrayOptions", "add_xray_arguments", "check_side_outputs", "intensity_reference",
           "manifest_geometries", "prepare_pair", "sample_kwargs", "save_preview", "sidecar", "training_geometry",
           "write_sidecar"]
