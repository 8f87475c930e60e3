"""``python -m dataset.prepare --input DIR --out DIR``: CT folder -> preprocessed volumes + DRR pairs + manifest.

Reads every CT in ``--input`` (``.nii`` / ``.nii.gz`` / ``.pt`` files and DICOM series folders, one
subject each, id = file or folder name), preprocesses it (:class:`dataset.preprocess.Preprocessor`),
renders its AP and lateral DRRs (:mod:`dataset.drr`) and writes the prepared-dataset layout::

    OUT/manifest.csv  OUT/dataset.json  OUT/ct/<id>.nii.gz (HU, int16)  OUT/xray/<id>/{AP,LAT}.pt

World frame: every prepared CT is centred on the DRR isocentre, i.e. its volume centre sits at RAS
(0, 0, 0) mm with LPI axes (``dataset.volume.volume_affine``), the frame of the DRR geometry and of
generated CTs, so a generated CT overlays its reference in a viewer. The scanner position of each
volume centre is kept in ``dataset.json`` (``world_frame.scanner_centre_ras_mm``).

Every file is written atomically. Subjects whose three outputs exist are skipped (resume); a
subject that fails is recorded with its reason and the rest go on. A CT wider than ``--size`` x
``--spacing`` is cropped; the summary says how many were and by how much, and suggests a spacing. Exit code 0 when at least one
subject is ready, 2 for bad arguments or when every subject fails.

Geometry: ``--sdd``, ``--sid``, ``--drr-size``, ``--pixel-spacing`` set the DRR geometry recorded in
``dataset.json``. The ``--jitter-*`` options give each subject its own seeded variation of it (source
distances, detector offset, view angle; the detector pixel count stays, so one model trains on all
subjects); the manifest then carries every subject's geometry in ``ap_sdd ... lat_reversed`` columns
(:meth:`dataset.drr.DRRGeometry.to_columns`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
import torchio as tio
from tqdm import tqdm

from dataset.cli import OneLineParser, number, one_line, parse_device, run_cli
from dataset.dataset_info import FILE_NAME, DatasetInfo
from dataset.drr import MAX_ANGLE, VIEWS, DRRGeometry, render_drr_pair
from dataset.intensity import HUWindow
from dataset.io import atomic_save_torch, ct_subject_id, is_ct_source, read_ct, write_nifti
from dataset.manifest import Manifest, assign_splits, is_plain_name, split_fractions
from dataset.preprocess import Preprocessor, preprocessed_volume
from dataset.volume import ORIENTATION, volume_affine

MANIFEST_NAME = "manifest.csv"
WORLD_FRAME = "isocentre"  # dataset.json world_frame.convention: volume centre at RAS (0, 0, 0) = DRR isocentre
_PER_SUBJECT = "scanner_centre_ras_mm"  # dataset.json world_frame entry that grows with the subjects


@dataclass
class PrepareSummary:
    """Outcome of one :func:`prepare_dataset` run."""

    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    manifest: Path | None = None
    noun: str = "subjects"
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.prepared) + len(self.skipped) + len(self.failed)

    def report(self, prog: str) -> int:
        """Print the summary; return exit code 0, or 2 (one error line on stderr) when nothing was written."""
        print(self.format())
        for warning in self.warnings:
            print(f"{prog}: warning: {warning}", file=sys.stderr)
        if self.manifest is None:
            print(f"{prog}: error: all {self.total} {self.noun} failed; nothing written", file=sys.stderr)
            return 2
        return 0

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"{self.total} {self.noun}: {len(self.prepared)} prepared, {len(self.skipped)} skipped "
                 f"(already done), {len(self.failed)} failed"]
        lines += [f"  failed {sid}: {why}" for sid, why in self.failed.items()]
        if self.manifest is not None:
            lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


def _span(value, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    lo, hi = (float(v) for v in value)
    if not (0 < lo <= hi < float("inf")):
        raise ValueError(f"{name} {lo:g} {hi:g} is invalid; expected 0 < MIN <= MAX (mm)")
    return lo, hi


@dataclass(frozen=True)
class GeometryJitter:
    """Seeded per-subject variation of a DRR geometry; each view is drawn on its own, uniformly.

    A subject's geometry depends only on ``seed`` and its id (resuming or adding subjects never changes
    it). Five numbers are drawn per view in a fixed order (SDD, SID, offset row, offset col, angle),
    whichever are enabled, so enabling one does not change the others.

    Args:
        sdd: (min, max) source-to-detector distance, mm; None keeps the base geometry's.
        sid: (min, max) source-to-isocentre distance, mm; None keeps the base geometry's.
        offset: largest detector offset along each detector axis, mm (0: none).
        angle: largest view-angle deviation about the superior-inferior axis, degrees (0: none).
        seed: jitter seed.
    """

    sdd: tuple[float, float] | None = None
    sid: tuple[float, float] | None = None
    offset: float = 0.0
    angle: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sdd", _span(self.sdd, "--jitter-sdd"))
        object.__setattr__(self, "sid", _span(self.sid, "--jitter-sid"))
        if not 0.0 <= float(self.offset) < float("inf"):
            raise ValueError(f"--jitter-offset {self.offset} is invalid; expected a non-negative number of mm")
        if not 0.0 <= float(self.angle) <= MAX_ANGLE:
            raise ValueError(f"--jitter-angle {self.angle} is invalid; expected degrees in [0, {MAX_ANGLE:g}]")

    @property
    def active(self) -> bool:
        """Whether any part of the geometry varies."""
        return self.sdd is not None or self.sid is not None or self.offset > 0 or self.angle > 0

    def distance_ranges(self, base: DRRGeometry) -> tuple[tuple[float, float], tuple[float, float]]:
        """((min, max) SDD, (min, max) SID) over every subject, in mm."""
        views = [base.view(v) for v in VIEWS]
        sdd = self.sdd or (min(v.sdd for v in views), max(v.sdd for v in views))
        sid = self.sid or (min(v.sid for v in views), max(v.sid for v in views))
        return sdd, sid

    def check(self, base: DRRGeometry) -> None:
        """Every draw must give a valid geometry: the largest SID stays below the smallest SDD."""
        (sdd_lo, _), (_, sid_hi) = self.distance_ranges(base)
        if sid_hi >= sdd_lo:
            raise ValueError(f"jitter ranges allow sid={sid_hi:g} mm >= sdd={sdd_lo:g} mm; expected every SID below "
                             "every SDD (the detector lies beyond the isocentre)")

    def sample(self, base: DRRGeometry, subject_id: str) -> DRRGeometry:
        """The geometry of one subject: ``base`` with this jitter's draws."""
        digest = hashlib.sha256(f"{self.seed}:{subject_id}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        out = base
        for view in VIEWS:
            u = torch.rand(5, generator=g, dtype=torch.float64).tolist()
            v = base.view(view)
            changes = {}
            if self.sdd is not None:
                changes["sdd"] = self.sdd[0] + u[0] * (self.sdd[1] - self.sdd[0])
            if self.sid is not None:
                changes["sid"] = self.sid[0] + u[1] * (self.sid[1] - self.sid[0])
            if self.offset > 0:
                changes["offset"] = (v.offset[0] + (2 * u[2] - 1) * self.offset, v.offset[1] + (2 * u[3] - 1) * self.offset)
            if self.angle > 0:
                changes["angle"] = max(-MAX_ANGLE, min(MAX_ANGLE, v.angle + (2 * u[4] - 1) * self.angle))
            out = replace(out, **{view.lower(): replace(v, **changes)})
        return out

    def to_dict(self) -> dict:
        """Plain dict for dataset.json."""
        return {"sdd": list(self.sdd) if self.sdd else None, "sid": list(self.sid) if self.sid else None,
                "offset_mm": float(self.offset), "angle_deg": float(self.angle), "seed": int(self.seed)}


def subject_paths(out: Path, subject_id: str) -> dict[str, Path]:
    """Output files of one subject in the prepared-dataset layout (keys ``ct``, ``ap``, ``lat``)."""
    return {"ct": out / "ct" / f"{subject_id}.nii.gz",
            "ap": out / "xray" / subject_id / "AP.pt",
            "lat": out / "xray" / subject_id / "LAT.pt"}


def world_frame_image(image: tio.ScalarImage) -> tuple[tio.ScalarImage, list[float]]:
    """Move a preprocessed (LPI) image into the dataset's world frame: volume centre at RAS (0, 0, 0).

    Returns:
        The image with the affine of :func:`dataset.volume.volume_affine` (same voxels, same spacing) and
        the RAS position (mm) its volume centre had before, i.e. in the scanner frame.
    """
    if image.orientation != tuple(ORIENTATION):
        raise ValueError(f"expected an {ORIENTATION} image, got {''.join(image.orientation)}")
    w, h, d = image.spatial_shape
    centre = image.affine @ [(w - 1) / 2, (h - 1) / 2, (d - 1) / 2, 1.0]
    sw, sh, sd = (float(v) for v in image.spacing)
    return (tio.ScalarImage(tensor=image.data, affine=volume_affine((d, h, w), (sd, sh, sw))),
            [round(float(c), 3) for c in centre[:3]])


def prepare_subject(image: tio.ScalarImage, paths: dict[str, Path], preprocessor: Preprocessor,
                    geometry: DRRGeometry, device: str | torch.device = "cpu") -> dict:
    """Preprocess one CT (HU), render its DRR pair and write the three files atomically.

    The DRRs are rendered (on ``device``) from the int16-rounded HU volume that is stored, so they
    match it exactly. The stored CT is in the dataset's world frame (:func:`world_frame_image`).
    X-rays are saved as float32 ``(1, rows, cols)`` in [0, 1].

    Returns:
        ``{"scanner_centre_ras_mm": [x, y, z], "extent_mm": [D, H, W]}``: where the volume centre was
        in the scanner frame, and the physical size of the CT before crop / pad.
    """
    oriented = tio.ToOrientation(ORIENTATION)(image)
    ew, eh, ed = (n * float(sp) for n, sp in zip(oriented.spatial_shape, oriented.spacing))
    pre = preprocessor(oriented)
    pre, centre = world_frame_image(tio.ScalarImage(tensor=pre.data.round(), affine=pre.affine))
    volume, spacing = preprocessed_volume(pre, preprocessor.window)
    with torch.no_grad():
        ap, lat = render_drr_pair(volume.to(device), spacing, geometry, preprocessor.window)
    atomic_save_torch(ap.cpu().contiguous(), paths["ap"])
    atomic_save_torch(lat.cpu().contiguous(), paths["lat"])
    write_nifti(pre, paths["ct"], dtype=torch.int16)
    return {_PER_SUBJECT: centre, "extent_mm": [ed, eh, ew]}


def crop_warning(extents: dict[str, list[float]], shape: tuple[int, int, int],
                 spacing: tuple[float, float, float]) -> str | None:
    """One line when the field of view ``shape`` x ``spacing`` is smaller than some CTs (they were cropped).

    Args:
        extents: physical size ``(D, H, W)`` in mm of each CT before crop / pad.
        shape, spacing: the dataset's volume size and spacing ``(D, H, W)``.
    """
    fov = [n * s for n, s in zip(shape, spacing)]
    cropped = {sid: max(1 - f / e for f, e in zip(fov, ext)) for sid, ext in extents.items()
               if any(e > f * 1.01 for f, e in zip(fov, ext))}
    if not cropped:
        return None
    worst = max(cropped, key=cropped.get)
    # the isotropic spacing that fits the widest CT along every axis
    need = max(e / n for ext in extents.values() for e, n in zip(ext, shape))
    return (f"--size {' '.join(map(str, shape))} at --spacing {' '.join(f'{s:g}' for s in spacing)} mm covers "
            f"{' x '.join(f'{f:.0f}' for f in fov)} mm, so {len(cropped)} of {len(extents)} CTs were cropped (up to "
            f"{100 * cropped[worst]:.0f}% of {worst}'s extent along one axis); pass --spacing {need:.3g} (or a "
            "larger --size) to keep whole CTs")
def _remove_partial(paths: dict[str, Path]) -> None:
    for p in paths.values():
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    with contextlib.suppress(OSError):
        paths["ap"].parent.rmdir()


def prepare_dataset(items: Sequence[tuple[str, Callable[[], tio.ScalarImage]]], out: str | Path,
                    preprocessor: Preprocessor, geometry: DRRGeometry, seed: int = 0,
                    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), labels: dict[str, int] | None = None,
                    extra_info: dict | None = None, progress: bool = True,
                    device: str | torch.device = "cpu", jitter: GeometryJitter | None = None) -> PrepareSummary:
    """Prepare a dataset from ``(subject_id, load_ct)`` pairs; the core of both CLIs.

    Args:
        items: subject id and a callable that returns its CT in HU (called only when not done yet).
        out: output folder (created; may hold an earlier run with the same settings).
        preprocessor: preprocessing settings; ``preprocessor.fit`` must be False (one spacing per dataset).
        geometry: DRR geometry for both views (the dataset's default, in ``dataset.json``).
        seed: split seed (splits already in ``out/manifest.csv`` are kept).
        fractions: ``(train, val, test)`` split fractions.
        labels: integer label per subject id (default 0).
        extra_info: extra JSON-able fields for dataset.json.
        progress: show a tqdm bar.
        device: where DRRs are rendered (``"cuda"`` is much faster for 256^3 volumes).
        jitter: per-subject geometry variation; the manifest then holds each subject's geometry columns.

    Returns:
        The summary. ``manifest.csv`` and ``dataset.json`` are written only if a subject is ready.

    Raises:
        ValueError: duplicate subject ids, ``fit`` preprocessing, or ``out`` prepared with other settings.
    """
    ids = [sid for sid, _ in items]
    if preprocessor.fit:
        raise ValueError("Preprocessor(fit=True) gives each CT its own spacing; a dataset needs one fixed spacing")
    extra = {"preprocess": preprocessor.to_dict(), "split_fractions": list(fractions), **(extra_info or {})}
    jitter = jitter if jitter is not None and jitter.active else None
    if jitter is not None:
        jitter.check(geometry)
        extra["geometry_jitter"] = jitter.to_dict()
    info = DatasetInfo(window=preprocessor.window, spacing=preprocessor.spacing, shape=preprocessor.shape,
                       geometry=geometry, split_seed=seed, extra={**extra, "world_frame": world_frame_info()})
    loaders = dict(items)
    extents: dict[str, list[float]] = {}
    geometry_of = (lambda sid: jitter.sample(geometry, sid)) if jitter is not None else (lambda sid: geometry)

    def write(sid: str, paths: dict[str, Path]) -> dict:
        facts = prepare_subject(loaders[sid](), paths, preprocessor, geometry_of(sid), device)
        extents[sid] = facts.pop("extent_mm")
        return facts

    columns = (lambda sid: geometry_of(sid).to_columns()) if jitter is not None else None
    summary = write_prepared_dataset(ids, out, info, write, fractions, labels, progress, row_columns=columns)
    warning = crop_warning(extents, preprocessor.shape, preprocessor.spacing)
    if warning:
        summary.warnings.append(warning)
    return summary


def world_frame_info() -> dict:
    """The ``world_frame`` entry of ``dataset.json`` (per-subject scanner centres are added as subjects are written)."""
    return {"convention": WORLD_FRAME,
            "description": "each CT's volume centre is at RAS (0, 0, 0) mm, the DRR isocentre, with LPI axes; "
                           "generated CTs use the same affine",
            _PER_SUBJECT: {}}


def write_prepared_dataset(ids: Sequence[str], out: str | Path, info: DatasetInfo,
                           write_subject: Callable[[str, dict[str, Path]], None],
                           fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                           labels: dict[str, int] | None = None, progress: bool = True,
                           desc: str = "prepare",
                           row_columns: Callable[[str], dict] | None = None) -> PrepareSummary:
    """The prepared-dataset loop shared by ``dataset.prepare`` and the converters.

    Skips subjects whose three files exist (resume), calls ``write_subject(sid, paths)`` for the rest
    (it must write ``paths["ct"]``, ``paths["ap"]``, ``paths["lat"]``, see :func:`subject_paths`),
    records each failure and removes that subject's partial files, then writes ``manifest.csv``
    (seeded split with ``info.split_seed``; existing splits kept) and ``dataset.json``.

    Args:
        ids: subject ids, in processing order.
        out: output folder.
        info: what ``dataset.json`` will hold; must equal an existing one in ``out`` to resume.
        write_subject: writes one subject's files; any exception marks the subject failed.
        fractions: ``(train, val, test)`` split fractions.
        labels: integer label per subject id (default 0).
        progress: show a tqdm bar.
        desc: progress bar label.
        row_columns: extra manifest columns of a subject (e.g. its DRR geometry columns).

    ``write_subject`` may return a dict; its ``scanner_centre_ras_mm`` goes into ``dataset.json``
    (``world_frame``) when ``info`` has a world frame.

    Returns:
        The summary. ``manifest.csv`` and ``dataset.json`` are written only if a subject is ready.

    Raises:
        ValueError: duplicate subject ids, or ``out`` prepared with other settings.
    """
    out = Path(out).resolve()  # manifest paths are written relative to the CSV, so build them absolute
    ids = list(ids)
    split_fractions(fractions)  # checked before any subject is written
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; expected an output folder")
    unsafe = [sid for sid in ids if not is_plain_name(str(sid))]
    if unsafe:
        raise ValueError(f"subject ids {unsafe[:5]} are invalid; expected plain names (no '/', '\\' or leading "
                         "'.'), since files are named after them")
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise ValueError(f"duplicate subject ids {dup[:5]} in the input; expected one CT per id")
    info_path = out / FILE_NAME
    frame_info = info.extra.get("world_frame")
    if info_path.is_file():
        old = DatasetInfo.load(info_path)
        new_d, old_d = _settings(info.to_dict()), _settings(old.to_dict())
        if frame_info is not None and "world_frame" not in old_d:
            raise ValueError(f"{out}: was prepared by an older version whose CTs keep the scanner frame (not centred "
                             "on the DRR isocentre); prepare again into a new --out")
        if old_d != new_d:
            diff = sorted(k for k in set(new_d) | set(old_d) if old_d.get(k) != new_d.get(k))
            raise ValueError(f"{out}: already holds a dataset prepared with different settings ({', '.join(diff)}); "
                             "expected the same settings to resume, or a new --out")
        if frame_info is not None:
            frame_info[_PER_SUBJECT].update(old.extra["world_frame"].get(_PER_SUBJECT, {}))
    out_existed = out.exists()
    summary = PrepareSummary()
    for sid in tqdm(ids, desc=desc, unit="subject", disable=not progress):
        paths = subject_paths(out, sid)
        if all(p.is_file() for p in paths.values()):
            summary.skipped.append(sid)
            continue
        try:
            facts = write_subject(sid, paths)
        except Exception as e:  # one bad subject must not stop the others; the reason is reported
            _remove_partial(paths)
            summary.failed[sid] = f"{type(e).__name__}: {one_line(e)}"  # library messages can span many lines
            continue
        if frame_info is not None and isinstance(facts, dict) and _PER_SUBJECT in facts:
            frame_info[_PER_SUBJECT][sid] = facts[_PER_SUBJECT]
        summary.prepared.append(sid)
    done = [sid for sid in ids if sid in set(summary.prepared) | set(summary.skipped)]
    if not done:
        if not out_existed:
            for sub in ("xray", "ct", ""):
                with contextlib.suppress(OSError):
                    (out / sub).rmdir()
        return summary
    manifest_path = out / MANIFEST_NAME
    existing = {}
    if manifest_path.is_file():
        old_frame = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
        if {"subject_id", "split"} <= set(old_frame.columns):
            existing = dict(zip(old_frame["subject_id"], old_frame["split"]))
    splits = assign_splits(done, info.split_seed, fractions, existing)
    labels = labels or {}
    rows = [{"subject_id": sid, **{k: str(p) for k, p in subject_paths(out, sid).items()},
             "label": int(labels.get(sid, 0)), "split": splits[sid], **(row_columns(sid) if row_columns else {})}
            for sid in done]
    Manifest.write(pd.DataFrame(rows), manifest_path)
    info.save(info_path)
    summary.manifest = manifest_path
    return summary


def _settings(info: dict) -> dict:
    """``dataset.json`` without what grows with the subjects (compared when a run resumes)."""
    if isinstance(info.get("world_frame"), dict):
        info = {**info, "world_frame": {k: v for k, v in info["world_frame"].items() if k != _PER_SUBJECT}}
    return info


def find_cts(input_dir: Path) -> list[tuple[str, Path]]:
    """CT sources directly inside ``input_dir`` as sorted ``(subject_id, path)`` pairs."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: no such folder; expected a folder of CTs")
    found = [(ct_subject_id(p), p) for p in sorted(input_dir.iterdir()) if is_ct_source(p)]
    if not found:
        hint = ""
        nested = (d for d in input_dir.rglob("*") if d.is_dir() and d.parent != input_dir)
        if any(is_ct_source(d) for d in nested):
            hint = (f"; it holds DICOM files in nested folders: convert them first with python -m "
                    f"dataset.convert_dicom --input {input_dir} --out <nifti folder>, then prepare that folder")
        raise ValueError(f"{input_dir}: holds no CTs; expected .nii, .nii.gz, .pt files or DICOM series folders{hint}")
    return found


def read_labels(path: Path) -> dict[str, int]:
    """A ``subject_id,label`` CSV as a dict."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels file; expected a CSV with subject_id,label")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"subject_id", "label"} <= set(frame.columns):
        raise ValueError(f"{path}: missing columns; expected subject_id,label")
    try:
        return {s: int(v) for s, v in zip(frame["subject_id"], frame["label"])}
    except ValueError as e:
        raise ValueError(f"{path}: label column holds non-integers ({e})") from e


def _triple_arg(values: list[float], name: str) -> tuple:
    if len(values) not in (1, 3):
        raise ValueError(f"--{name} takes one or three values (D H W), got {len(values)}")
    return tuple(values) * 3 if len(values) == 1 else tuple(values)


def add_geometry_arguments(p: argparse.ArgumentParser, drr_size: int) -> None:
    """DRR geometry and per-subject jitter options (shared by ``dataset.prepare`` and ``dataset.prepare_demo``)."""
    mm = number(float, 0, min_open=True)
    p.add_argument("--drr-size", type=number(int, 2), default=drr_size, help=f"detector pixels, square (default {drr_size})")
    p.add_argument("--sdd", type=mm, default=1500.0, help="source-to-detector distance, mm (default 1500)")
    p.add_argument("--sid", type=mm, default=1000.0, help="source-to-isocentre distance, mm (default 1000)")
    p.add_argument("--pixel-spacing", type=mm, default=None,
                   help="detector pixel pitch, mm (default: the whole volume fits the detector at every subject's "
                        "geometry)")
    p.add_argument("--wet-scale", type=mm, default=250.0, help="DRR contrast: water-equivalent mm -> 1-1/e")
    p.add_argument("--jitter-sdd", type=mm, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="per-subject SDD drawn uniformly in [MIN, MAX] mm, each view on its own (default: off)")
    p.add_argument("--jitter-sid", type=mm, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="per-subject SID drawn uniformly in [MIN, MAX] mm, each view on its own (default: off)")
    p.add_argument("--jitter-offset", type=number(float, 0), default=0.0, metavar="MM",
                   help="per-subject detector offset, uniform in [-MM, MM] along each detector axis (default 0)")
    p.add_argument("--jitter-angle", type=number(float, 0, MAX_ANGLE), default=0.0, metavar="DEG",
                   help="per-subject view-angle deviation, uniform in [-DEG, DEG] per view (default 0)")
    p.add_argument("--jitter-seed", type=number(int, 0), default=None, help="jitter seed (default: --seed)")


def geometry_from_args(args: argparse.Namespace, pre: Preprocessor) -> tuple[DRRGeometry, GeometryJitter | None]:
    """The dataset's default DRR geometry and the per-subject jitter (None when off) from the CLI options.

    Without ``--pixel-spacing`` the pitch is chosen so that the whole volume fits the detector at the
    largest magnification any subject gets.
    """
    seed = args.jitter_seed if args.jitter_seed is not None else args.seed
    jitter = GeometryJitter(args.jitter_sdd, args.jitter_sid, args.jitter_offset, args.jitter_angle, seed)
    size = (args.drr_size, args.drr_size)
    base = DRRGeometry.uniform(args.sdd, args.sid, size, args.pixel_spacing or 1.0, args.wet_scale)
    jitter.check(base)
    (_, sdd_hi), (sid_lo, _) = jitter.distance_ranges(base)
    half = max(n * s / 2 for n, s in zip(pre.shape[1:], pre.spacing[1:]))
    if sid_lo <= half:
        raise ValueError(f"sid={sid_lo:g} mm puts the source inside the volume (half width {half:.1f} mm); "
                         "expected a larger --sid / --jitter-sid")
    if args.pixel_spacing is None:  # fitted where the magnification is largest
        pitch = DRRGeometry.fit(pre.shape, pre.spacing, size, sdd_hi, sid_lo, args.wet_scale).pixel_spacing[0]
        base = DRRGeometry.uniform(args.sdd, args.sid, size, pitch, args.wet_scale)
    return base, (jitter if jitter.active else None)


def build_parser() -> OneLineParser:
    """The ``dataset.prepare`` argument parser."""
    p = OneLineParser(prog="python -m dataset.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, required=True, help="folder of CTs (.nii/.nii.gz/.pt files, DICOM folders)")
    p.add_argument("--out", type=Path, required=True, help="output folder (prepared-dataset layout)")
    p.add_argument("--size", type=number(int, min=1), nargs="+", default=[256], help="target shape D H W (or one value)")
    p.add_argument("--spacing", type=number(float, min=0, min_open=True), nargs="+", default=[1.5], help="target spacing mm D H W (or one)")
    p.add_argument("--hu-min", type=number(float), default=-1000.0, help="HU window lower end (maps to -1)")
    p.add_argument("--hu-max", type=number(float), default=1000.0, help="HU window upper end (maps to +1)")
    add_geometry_arguments(p, drr_size=256)
    p.add_argument("--seed", type=number(int, min=0), default=0, help="split seed")
    p.add_argument("--split", type=number(float, min=0), nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--labels", type=Path, default=None, help="CSV subject_id,label (default label 0)")
    p.add_argument("--pt-spacing", type=number(float, min=0, min_open=True), nargs=3, default=[1.0, 1.0, 1.0],
                   help="spacing mm (D H W) of .pt tensors that do not store one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for DRR rendering (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int | None:
        pre = Preprocessor(shape=_triple_arg(args.size, "size"), spacing=_triple_arg(args.spacing, "spacing"),
                           window=HUWindow(args.hu_min, args.hu_max))
        geometry, jitter = geometry_from_args(args, pre)
        labels = read_labels(args.labels) if args.labels is not None else None
        sources = find_cts(args.input)
        pt_spacing = tuple(args.pt_spacing)
        items = [(sid, lambda p=path: read_ct(p, pt_spacing=pt_spacing)) for sid, path in sources]
        summary = prepare_dataset(items, args.out, pre, geometry, args.seed, tuple(args.split), labels,
                                  extra_info={"source": str(args.input.resolve())}, progress=not args.no_progress,
                                  device=parse_device(args.device), jitter=jitter)
        return summary.report(parser.prog)

    return run_cli(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
