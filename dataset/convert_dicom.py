"""``python -m dataset.convert_dicom --input DIR --out DIR``: DICOM series (nested folders) -> one NIfTI each.

Every file under ``--input`` that starts with the DICOM preamble (``DICM`` at byte 128) is read;
image slices are grouped by ``SeriesInstanceUID`` (several series may share a folder), sorted along
the slice normal and stacked. Values are ``stored * RescaleSlope + RescaleIntercept`` per slice (HU
for CT). The affine comes from ``ImagePositionPatient`` / ``ImageOrientationPatient`` /
``PixelSpacing`` (DICOM LPS converted to the NIfTI RAS world), so the NIfTI opens the right way
round in any viewer and ``dataset.prepare --input OUT`` reads it directly.

Output::

    OUT/<name>.nii.gz   one per series (int16 HU by default; --dtype float32 keeps fractions)
    OUT/series.csv      file, series_uid, patient_id, series_number, description, source_folder, slices

``<name>`` is the series' folder relative to ``--input`` (``/`` -> ``_``), plus ``_s<SeriesNumber>``
when that folder holds several series. Writes are atomic; existing outputs are skipped (resume)
unless ``--overwrite``. A series that cannot be converted (missing slice, mixed orientations,
multi-frame, compressed pixels without a decoder, NaN) is reported and the others go on. Exit code
0 when at least one series is ready, 2 for bad arguments or when every series fails.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
import torchio as tio
from tqdm import tqdm

from dataset.cli import OneLineParser, run_cli
from dataset.io import _is_dicom_file, atomic_write_text, write_nifti
from dataset.prepare import PrepareSummary

INDEX_NAME = "series.csv"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomSeries:
    """The files of one DICOM series and what identifies it.

    Args:
        uid: ``SeriesInstanceUID``.
        files: the slice files (any order).
        folder: deepest folder holding all of them.
        patient_id, series_number, description: header fields (empty when absent).
    """

    uid: str
    files: tuple[Path, ...]
    folder: Path
    patient_id: str = ""
    series_number: str = ""
    description: str = ""


def find_dicom_series(root: str | Path) -> tuple[list[DicomSeries], dict[str, str]]:
    """Group the DICOM image files under ``root`` (recursively) by series.

    Files without the DICOM preamble are ignored; DICOM objects that are not image slices (DICOMDIR,
    reports: a SOP class but no series / image size) are skipped.

    Returns:
        ``(series, unreadable)``: series sorted by folder then series number, and
        ``{file: reason}`` for files that start like DICOM but whose header cannot be read.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; expected a folder of DICOM series")
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    unreadable: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if not _is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # pydicom raises assorted types for truncated / corrupt headers
            unreadable[str(path)] = f"cannot read the DICOM header ({type(e).__name__}: {e})"
            continue
        if "SeriesInstanceUID" not in ds or "Rows" not in ds or "Columns" not in ds:
            # a real DICOM object that is no image (DICOMDIR, report) names its SOP class; garbage does not
            meta = getattr(ds, "file_meta", None)
            if "SOPClassUID" not in ds and (meta is None or "MediaStorageSOPClassUID" not in meta):
                unreadable[str(path)] = "DICOM preamble but no SOP class, series or image size; expected a DICOM slice"
            continue
        groups[str(ds.SeriesInstanceUID)].append((path, ds))
    series = []
    for uid, members in groups.items():
        files = tuple(p for p, _ in members)
        first = members[0][1]
        folder = files[0].parent
        for p in files[1:]:
            while folder not in p.parents:
                folder = folder.parent
        series.append(DicomSeries(uid, files, folder, str(first.get("PatientID", "")),
                                  str(first.get("SeriesNumber", "")), str(first.get("SeriesDescription", ""))))
    series.sort(key=lambda s: (str(s.folder), _number_key(s.series_number), s.uid))
    return series, unreadable


def _number_key(text: str) -> tuple[int, str]:
    return (int(text), "") if text.strip().lstrip("-").isdigit() else (sys.maxsize, text)


def series_names(series: Sequence[DicomSeries], root: str | Path) -> list[str]:
    """File-name stem of each series' NIfTI (unique; see the module docstring)."""
    root = Path(root)
    per_folder: dict[Path, int] = defaultdict(int)
    for s in series:
        per_folder[s.folder] += 1
    names, used = [], set()
    for s in series:
        rel = s.folder.relative_to(root).as_posix() if s.folder != root else root.resolve().name
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace("/", "_")).strip("_.") or "series"
        if per_folder[s.folder] > 1:
            base += f"_s{re.sub(r'[^A-Za-z0-9]+', '', s.series_number) or s.uid.split('.')[-1]}"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names.append(name)
    return names


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.empty(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise ValueError(f"{path}: {keyword} is {value!r}; expected {n} finite numbers")
    return out


def read_dicom_series(files: Sequence[str | Path], name: str = "series") -> tio.ScalarImage:
    """Read one DICOM series as a float32 image in rescaled units (HU for CT) with its RAS affine.

    Args:
        files: the series' slice files (any order; one frame each).
        name: how error messages refer to the series.

    Returns:
        A one-channel :class:`tio.ScalarImage`, data ``(1, I, J, K)`` with ``I`` along a row
        (DICOM columns), ``J`` down the columns (DICOM rows), ``K`` along the slice normal.

    Raises:
        ValueError: fewer than 2 slices, a slice without geometry, multi-frame or undecodable pixels,
            slices that disagree in size / orientation / pixel spacing, duplicate or unevenly spaced
            positions (a missing slice), gantry tilt, or NaN / Inf values; the message names the
            series and, where it is one file's fault, the file.
    """
    files = [Path(f) for f in files]
    if len(files) < 2:
        raise ValueError(f"{name}: {len(files)} slice; expected a volume of at least 2 slices")
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:  # corrupt file
            raise ValueError(f"{path}: cannot be read as DICOM ({type(e).__name__}: {e})") from e
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames); expected one slice per file")
        iop = _floats(ds, "ImageOrientationPatient", 6, path)
        ipp = _floats(ds, "ImagePositionPatient", 3, path)
        spacing = _floats(ds, "PixelSpacing", 2, path)
        try:
            pixels = ds.pixel_array
        except Exception as e:  # compressed transfer syntax without a decoder, truncated pixel data
            raise ValueError(f"{path}: pixel data cannot be decoded ({type(e).__name__}: {e})") from e
        if pixels.ndim != 2:
            raise ValueError(f"{path}: pixel array has shape {pixels.shape}; expected a grayscale slice (rows, columns)")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append((path, iop, ipp, spacing, pixels.astype(np.float64) * slope + intercept))
    path0, iop0, _, spacing0, pixels0 = slices[0]
    for path, iop, _, spacing, pixels in slices[1:]:
        if pixels.shape != pixels0.shape:
            raise ValueError(f"{name}: {path.name} is {pixels.shape} pixels but {path0.name} is {pixels0.shape}; "
                             "expected one slice size per series")
        if not np.allclose(iop, iop0, atol=1e-4):
            raise ValueError(f"{name}: {path.name} has orientation {iop.tolist()} but {path0.name} {iop0.tolist()}; "
                             "expected one orientation per series")
        if not np.allclose(spacing, spacing0, rtol=1e-4):
            raise ValueError(f"{name}: {path.name} has pixel spacing {spacing.tolist()} but {path0.name} "
                             f"{spacing0.tolist()}; expected one pixel spacing per series")
    row_dir, col_dir = iop0[:3], iop0[3:]  # along a row (increasing column), down a column
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(s[2] @ normal))
    positions = np.stack([s[2] for s in slices])  # (K, 3) LPS mm
    along = positions @ normal
    steps = np.diff(along)
    if steps.min() < 1e-3:
        k = int(np.argmin(steps))
        raise ValueError(f"{name}: {slices[k][0].name} and {slices[k + 1][0].name} lie at the same position "
                         f"({along[k]:.3f} mm); expected one slice per position")
    step = float(along[-1] - along[0]) / (len(slices) - 1)
    if np.abs(steps - step).max() > max(0.01 * step, 1e-3):
        k = int(np.argmax(np.abs(steps - step)))
        raise ValueError(f"{name}: slice gap {steps[k]:.3f} mm after {slices[k][0].name} differs from the mean "
                         f"{step:.3f} mm; expected evenly spaced slices (is a slice missing?)")
    off_axis = positions - positions[:1] - np.outer(along - along[0], normal)
    if np.abs(off_axis).max() > 1e-2 * max(abs(step), 1.0):
        raise ValueError(f"{name}: slice positions drift sideways (gantry tilt); expected slices stacked along "
                         "the normal")
    row_spacing, col_spacing = spacing0  # DICOM PixelSpacing = (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    data = np.stack([s[4] for s in slices], axis=-1).transpose(1, 0, 2)  # (rows, cols, K) -> (I, J, K)
    if not np.isfinite(data).all():
        raise ValueError(f"{name}: {int((~np.isfinite(data)).sum())} voxels are NaN or Inf after rescaling; "
                         "expected finite values")
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    return tio.ScalarImage(tensor=tensor, affine=_LPS_TO_RAS @ lps)


def convert_dicom_folder(input_dir: str | Path, out: str | Path, dtype: str = "int16", overwrite: bool = False,
                  progress: bool = True) -> PrepareSummary:
    """Convert every DICOM series under ``input_dir`` into ``out/<name>.nii.gz`` plus ``out/series.csv``.

    Args:
        input_dir: folder searched recursively.
        out: output folder (created).
        dtype: ``"int16"`` (rounded, like ``dataset.prepare``) or ``"float32"``.
        overwrite: convert again even when the NIfTI exists.
        progress: show a tqdm bar.

    Returns:
        The summary (series names; unreadable files appear under ``failed`` by path). ``series.csv``
        lists every ready series and is written only if there is one.

    Raises:
        FileNotFoundError: ``input_dir`` is missing.
        ValueError: bad ``dtype``, or no DICOM image file at all under ``input_dir``.
    """
    if dtype not in ("int16", "float32"):
        raise ValueError(f"dtype={dtype!r} is invalid; expected 'int16' or 'float32'")
    input_dir, out = Path(input_dir), Path(out)
    series, unreadable = find_dicom_series(input_dir)
    if not series and not unreadable:
        raise ValueError(f"{input_dir}: holds no DICOM image files; expected files with the DICM preamble")
    summary = PrepareSummary(noun="series")
    summary.failed.update(unreadable)
    rows = []
    names = series_names(series, input_dir)
    for s, name in tqdm(list(zip(series, names)), desc="dicom", unit="series", disable=not progress):
        target = out / f"{name}.nii.gz"
        if target.is_file() and not overwrite:
            summary.skipped.append(name)
        else:
            try:
                image = read_dicom_series(s.files, name)
                write_nifti(image, target, dtype=torch.int16 if dtype == "int16" else None)
            except Exception as e:  # one bad series must not stop the others; the reason is reported
                summary.failed[name] = f"{type(e).__name__}: {e}"
                continue
            summary.prepared.append(name)
        rows.append({"file": target.name, "series_uid": s.uid, "patient_id": s.patient_id,
                     "series_number": s.series_number, "description": s.description,
                     "source_folder": s.folder.resolve().as_posix(), "slices": len(s.files)})
    if rows:
        index = out / INDEX_NAME
        if index.is_file():  # keep series written by earlier runs from other inputs
            old = pd.read_csv(index, dtype=str, keep_default_na=False)
            old = old[~old["file"].isin([r["file"] for r in rows])] if "file" in old.columns else old.iloc[:0]
            frame = pd.concat([old, pd.DataFrame(rows).astype(str)], ignore_index=True)
        else:
            frame = pd.DataFrame(rows)
        atomic_write_text(index, frame.to_csv(index=False))
        summary.manifest = index
    return summary


def build_parser() -> OneLineParser:
    """The ``dataset.convert_dicom`` argument parser."""
    p = OneLineParser(prog="python -m dataset.convert_dicom", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, required=True, help="folder searched recursively for DICOM files")
    p.add_argument("--out", type=Path, required=True, help="output folder for <name>.nii.gz and series.csv")
    p.add_argument("--dtype", choices=("int16", "float32"), default="int16",
                   help="NIfTI voxel type: int16 (rounded HU, default) or float32")
    p.add_argument("--overwrite", action="store_true", help="convert series whose NIfTI already exists again")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> int | None:
        summary = convert_dicom_folder(args.input, args.out, args.dtype, args.overwrite, progress=not args.no_progress)
        return summary.report(parser.prog)

    return run_cli(parser.prog, work)


if __name__ == "__main__":
    sys.exit(main())
