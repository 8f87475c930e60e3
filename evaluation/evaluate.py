"""Evaluate generated CT volumes against references: per-case CSV + JSON summary with definitions.

Usage::

    python -m evaluation.evaluate --pred outputs/generated --ref data/prepared/manifest.csv --split test \\
        --out outputs/eval [--medicalnet-weights resnet_10_23dataset.pth] [--figures] [--overwrite]

``--pred`` holds ``<subject_id>.nii.gz`` (or ``.nii``) volumes in HU; an optional
``<subject_id>_std.nii.gz`` (per-voxel standard deviation over samples, in HU) is used for figures only.
``--ref`` is a folder of ``<subject_id>.nii.gz`` reference CTs, or a prepared dataset's ``manifest.csv``
(reference CTs, X-rays and, next to it, ``dataset.json`` with the HU window and DRR geometry).
Every prediction must have a reference; with a manifest every subject of ``--split`` must have a
prediction. Both volumes are mapped to [-1, 1] with the HU window (clipping), then scored with
:mod:`evaluation.metrics`. DRR re-projection consistency is computed when X-rays and a geometry are
known. Lung and bone Dice come from fixed HU thresholds applied to both volumes alike
(:func:`evaluation.metrics.anatomy_masks`; when the HU window contains them). FID / MMD on MedicalNet
ResNet-10 features are computed with ``--medicalnet-weights``.

Writes ``OUT/per_case.csv`` and ``OUT/summary.json`` (and ``OUT/figures/<id>.png`` with ``--figures``),
each atomically and only after every case was scored, so a bad input leaves nothing behind. Bad input
-> one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataset import (
    DatasetInfo,
    DRRGeometry,
    HUWindow,
    Manifest,
    image_to_volume,
    read_ct,
    render_drr_pair,
)
from dataset.cli import OneLineParser, number, run_cli
from dataset.io import atomic_write, atomic_write_json, atomic_write_text, check_writable
from dataset.radiograph import read_radiograph
from evaluation import metrics
from evaluation.figures import mpr_figure

__all__ = ["CasePair", "evaluate_pairs", "find_pairs", "has_anatomy", "main", "write_results"]

PROG = "python -m evaluation.evaluate"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
STD_SUFFIX = "_std"
SAMPLE_RE = re.compile(r"(.+)_sample\d+")
PER_CASE_FILE = "per_case.csv"
SUMMARY_FILE = "summary.json"
FIGURE_DIR = "figures"

#: Per-case columns in the order written; DRR columns only when X-rays and a geometry are known.
VOLUME_KEYS = ("psnr_db", "ssim_3d", "mae_hu", "x2ct_slice_psnr_db", "x2ct_slice_ssim")
DRR_KEYS = ("drr_ap_psnr_db", "drr_ap_ssim", "drr_lat_psnr_db", "drr_lat_ssim")
#: Per-case anatomy columns (when the HU window contains the thresholds, :func:`has_anatomy`).
ANATOMY_KEYS = ("lung_dice", "bone_dice")


def has_anatomy(window: HUWindow) -> bool:
    """Whether the HU window contains the anatomy thresholds (else lung / bone Dice are not computed)."""
    return window.hu_min < min(metrics.BODY_HU, metrics.LUNG_HU) and metrics.BONE_HU < window.hu_max


@dataclass(frozen=True)
class CasePair:
    """One case to evaluate.

    Args:
        subject_id: the id shared by the prediction and the reference.
        pred: generated CT (NIfTI, HU).
        ref: reference CT (NIfTI, HU; or any format ``dataset.read_ct`` reads).
        ap: input AP X-ray ``.pt`` ((1, H, W) in [0, 1]) or ``None``.
        lat: input lateral X-ray ``.pt`` or ``None``.
        std: per-voxel standard deviation of the generated samples (NIfTI, HU) or ``None``.
        geometry: this case's own DRR geometry (manifest geometry columns), or ``None`` for the dataset's.
    """

    subject_id: str
    pred: Path
    ref: Path
    ap: Path | None = None
    lat: Path | None = None
    std: Path | None = None
    geometry: DRRGeometry | None = None


def _nifti_id(path: Path) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _nifti_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; expected {what} as <subject_id>.nii.gz files")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        sid = _nifti_id(p)
        if sid is None or not p.is_file() or p.name.startswith("."):
            continue
        if sid in files:
            raise ValueError(f"{folder}: subject {sid!r} appears twice ({files[sid].name}, {p.name})")
        files[sid] = p
    return files


def find_pairs(
    pred_dir: str | os.PathLike,
    ref: str | os.PathLike,
    split: str | None = None,
    xray_dir: str | os.PathLike | None = None,
) -> list[CasePair]:
    """Pair generated volumes with references by subject id.

    Args:
        pred_dir: folder of ``<id>.nii.gz`` predictions (``<id>_std.nii.gz`` = optional uncertainty;
            ``<id>_sample<k>.nii.gz`` individual samples beside their mean are ignored).
        ref: folder of ``<id>.nii.gz`` references, or a prepared dataset's ``manifest.csv``.
        split: manifest split to evaluate (default ``"test"``); only valid with a manifest.
        xray_dir: folder with ``<id>/AP.pt`` and ``<id>/LAT.pt``; default the manifest's ``ap`` / ``lat``.

    Returns:
        Cases sorted by subject id.

    Raises:
        FileNotFoundError: a folder, manifest or listed file is missing.
        ValueError: predictions without a reference, split subjects without a prediction, no cases.
    """
    pred_dir, ref = Path(pred_dir), Path(ref)
    preds = _nifti_files(pred_dir, "generated volumes")
    stds = {sid[: -len(STD_SUFFIX)]: p for sid, p in preds.items() if sid.endswith(STD_SUFFIX)}
    preds = {sid: p for sid, p in preds.items() if not (sid.endswith(STD_SUFFIX) and sid[: -len(STD_SUFFIX)] in preds)}
    stds = {sid: p for sid, p in stds.items() if sid in preds}
    # individual samples written beside their mean by evaluation.generate_ct (--num-samples K > 1)
    preds = {sid: p for sid, p in preds.items() if not ((m := SAMPLE_RE.fullmatch(sid)) and m.group(1) in preds)}
    if not preds:
        raise ValueError(f"{pred_dir}: no generated volumes (<subject_id>.nii.gz) found")

    xrays: dict[str, tuple[Path | None, Path | None]] = {}
    geometries: dict[str, DRRGeometry] = {}
    if ref.is_file() and ref.suffix == ".csv":
        frame = Manifest.load(ref, check_files=False).split(split or "test")
        if len(frame) == 0:
            raise ValueError(f"{ref}: split {split or 'test'!r} has no subjects")
        refs = dict(zip(frame["subject_id"], map(Path, frame["ct"])))
        xrays = {sid: (Path(a) if a else None, Path(b) if b else None)
                 for sid, a, b in zip(frame["subject_id"], frame["ap"], frame["lat"])}
        default = DatasetInfo.load(ref.parent).geometry if (ref.parent / "dataset.json").is_file() else None
        if default is not None and set(default.to_columns()) & set(frame.columns):  # per-case geometry columns
            try:
                geometries = {row["subject_id"]: DRRGeometry.from_columns(row, default) for _, row in frame.iterrows()}
            except ValueError as e:
                raise ValueError(f"{ref}: {e}") from None
        missing_pred = sorted(set(refs) - set(preds))
        if missing_pred:
            raise ValueError(
                f"{pred_dir}: no prediction for {len(missing_pred)} subjects of split {split or 'test'!r} "
                f"in {ref}, e.g. {missing_pred[:5]}"
            )
    elif ref.is_dir():
        if split is not None:
            raise ValueError(f"--split {split} only applies when the reference is a manifest.csv, not the folder {ref}")
        refs = _nifti_files(ref, "reference CTs")
    else:
        raise FileNotFoundError(f"{ref}: expected a folder of reference NIfTI files or a manifest.csv")

    missing_ref = sorted(set(preds) - set(refs))
    if missing_ref:
        raise ValueError(f"{ref}: no reference for {len(missing_ref)} predictions in {pred_dir}, e.g. {missing_ref[:5]}")
    if xray_dir is not None:
        xray_dir = Path(xray_dir)
        if not xray_dir.is_dir():
            raise FileNotFoundError(f"{xray_dir}: no such folder; expected <subject_id>/AP.pt and LAT.pt")
        xrays = {sid: (xray_dir / sid / "AP.pt", xray_dir / sid / "LAT.pt") for sid in preds}

    pairs = []
    for sid in sorted(preds):
        ap, lat = xrays.get(sid, (None, None))
        for label, p in (("reference CT", refs[sid]), ("AP X-ray", ap), ("LAT X-ray", lat)):
            if p is not None and not p.exists():
                raise FileNotFoundError(f"{p}: no such file; expected the {label} of subject {sid!r}")
        pairs.append(CasePair(sid, preds[sid], refs[sid], ap, lat, stds.get(sid), geometries.get(sid)))
    return pairs


def _check_nifti_finite(path: Path, what: str) -> None:
    """Raise if a NIfTI file stores NaN/Inf voxels.

    Checked on the raw file with nibabel because the ITK reader behind ``tio.ScalarImage`` replaces NaN
    with 0, which would silently score a broken prediction.
    """
    if not path.name.endswith(NIFTI_SUFFIXES):
        return
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:  # nibabel raises assorted types for corrupt files
        raise ValueError(f"{what} {path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from e
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise ValueError(f"{what} {path} contains non-finite values ({n_bad} NaN/Inf voxels); expected finite HU")


def _read_volume(path: Path, window: HUWindow, what: str) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """A NIfTI CT in HU -> ``(1, D, H, W)`` in [-1, 1] and its spacing; non-finite voxels raise."""
    _check_nifti_finite(path, what)
    image = read_ct(path, check=False)
    hu, spacing = image_to_volume(image)
    if hu.shape[0] != 1:
        raise ValueError(f"{path}: {what} has {hu.shape[0]} channels; expected one")
    metrics.check_finite(hu, f"{what} {path}")
    return window.to_unit(hu), spacing


def _summarise(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, sample std (ddof 1; None for n = 1), n and how many values are +inf (identical inputs)."""
    arr = np.asarray(values, dtype=np.float64)
    n_inf = int(np.isposinf(arr).sum())
    if n_inf:
        return {"mean": math.inf, "std": None, "n": len(arr), "n_inf": n_inf}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None, "n": len(arr),
            "n_inf": 0}


def _definitions(window: HUWindow, drr: bool, anatomy: bool = False) -> dict[str, str]:
    w = f"[{window.hu_min:g}, {window.hu_max:g}] HU"
    d = {
        "intensity": f"volumes read in HU, clipped to the window {w} and mapped linearly to [-1, 1]",
        "psnr_db": ("whole-volume PSNR in dB: 20 log10(R) - 10 log10(MSE over all voxels), R = 2 on [-1, 1], "
                    f"identical to PSNR in HU with R = window width {window.width:g} HU; +inf for identical volumes"),
        "ssim_3d": (f"3D SSIM (monai SSIMMetric, spatial_dims=3), Gaussian window {metrics.SSIM_WIN_SIZE}^3, "
                    f"sigma {metrics.SSIM_SIGMA}, K1 0.01, K2 0.03, data range 2 on [-1, 1], valid positions only"),
        "mae_hu": f"mean absolute error in HU within the window {w}",
        "x2ct_slice_psnr_db": ("X2CT-compatible: 2D PSNR of every axial slice (data range 2 on [-1, 1]) averaged "
                               "over slices; NOT comparable with psnr_db; +inf if any slice is identical"),
        "x2ct_slice_ssim": (f"X2CT-compatible: 2D SSIM of every axial slice (Gaussian {metrics.SSIM_WIN_SIZE}^2, "
                            f"sigma {metrics.SSIM_SIGMA}, data range 2) averaged over slices; NOT comparable with ssim_3d"),
        "summary": "mean, sample standard deviation (ddof 1, null for n = 1) and n over cases; "
                   "mean is \"inf\" when n_inf > 0 cases are +inf",
    }
    if anatomy:
        d["anatomy_dice"] = (
            "Dice 2|P&R|/(|P|+|R|) of threshold masks computed the same way on both volumes (1 if both are empty): "
            f"body = HU > {metrics.BODY_HU:g}, largest 3D connected component, holes filled per axial slice; "
            f"lung_dice: body voxels with HU < {metrics.LUNG_HU:g} (lungs and airways); "
            f"bone_dice: body voxels with HU >= {metrics.BONE_HU:g} (cortical and dense trabecular bone; "
            "iodine-enhanced blood above that counts too)")
    else:
        d["anatomy_dice"] = (f"not computed: the HU window {w} does not contain the thresholds "
                             f"({metrics.BODY_HU:g} and {metrics.BONE_HU:g} HU)")
    if drr:
        d["drr_consistency"] = ("the generated CT is rendered with the input's DRR geometry (dataset.drr) and "
                                "compared with the input X-rays on [0, 1]: PSNR with data range 1 and 2D SSIM "
                                f"(Gaussian {metrics.SSIM_WIN_SIZE}^2, sigma {metrics.SSIM_SIGMA}), per view AP and LAT")
    return d


def evaluate_pairs(
    pairs: Sequence[CasePair],
    window: HUWindow | None = None,
    geometry: DRRGeometry | None = None,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fid_min_samples: int | None = None,
    figures: bool = False,
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """Score every case; nothing is written.

    Args:
        pairs: cases from :func:`find_pairs` (or built by hand).
        window: HU window mapping both volumes to [-1, 1] (clipping); default [-1000, 1000].
        geometry: DRR geometry of the input X-rays; with it, cases that have ``ap`` and ``lat`` get the
            re-projection metrics (every case must then have them), each with its own ``pair.geometry``
            when it has one.
        feature_extractor: e.g. ``AutoEncoder.medicalnet.load_medicalnet(path)``; adds FID / MMD on
            :func:`evaluation.metrics.extract_features` of predictions vs references.
        fid_min_samples: minimum cases for FID (default features + 1, see ``metrics.fid_min_samples``);
            below it FID is reported as null with the reason.
        figures: also draw an MPR figure per case; returned in the summary under ``"_figures"``
            (``{subject_id: (H, W, 3) uint8}``), which :func:`write_results` writes as PNGs.
        progress: show a tqdm bar on stderr.

    Returns:
        ``(rows, summary)``: one dict per case (``subject_id``, ``pred``, ``ref``, metric columns) and a
        JSON-able summary (``n_cases``, ``window``, ``metrics`` -> mean/std/n/n_inf, ``feature_metrics``,
        ``definitions``).

    Raises:
        ValueError / FileNotFoundError: unreadable files, shape or spacing mismatch, NaN/Inf voxels,
            missing X-rays when a geometry is given; the message names the case.
    """
    if not pairs:
        raise ValueError("no cases to evaluate")
    window = window or HUWindow()
    with_drr = geometry is not None
    with_anatomy = has_anatomy(window)
    if with_drr:
        lacking = [p.subject_id for p in pairs if p.ap is None or p.lat is None]
        if lacking:
            raise ValueError(f"a DRR geometry was given but cases {lacking[:5]} have no AP/LAT X-rays")
    rows: list[dict] = []
    feats_pred: list[torch.Tensor] = []
    feats_ref: list[torch.Tensor] = []
    images: dict[str, np.ndarray] = {}
    for pair in tqdm(pairs, desc="evaluate", unit="case", disable=not progress, file=sys.stderr):
        case = f"case {pair.subject_id!r}:"
        pred, pred_spacing = _read_volume(pair.pred, window, f"{case} prediction")
        ref, ref_spacing = _read_volume(pair.ref, window, f"{case} reference")
        if pred.shape != ref.shape:
            raise ValueError(
                f"{case} prediction {pair.pred} has shape {tuple(pred.shape[1:])} but reference {pair.ref} has "
                f"{tuple(ref.shape[1:])}; expected the same (D, H, W)"
            )
        if not np.allclose(pred_spacing, ref_spacing, rtol=1e-3, atol=1e-4):
            raise ValueError(
                f"{case} prediction spacing {pred_spacing} mm differs from reference spacing {ref_spacing} mm"
            )
        row: dict = {"subject_id": pair.subject_id, "pred": str(pair.pred), "ref": str(pair.ref)}
        row.update(metrics.volume_metrics(pred, ref, window, name=f"{case}"))
        if with_anatomy:
            row.update(metrics.anatomy_dice(pred, ref, window, name=case))
        ap = lat = None
        if pair.ap is not None and pair.lat is not None:
            ap, lat = read_radiograph(pair.ap).image, read_radiograph(pair.lat).image
        if with_drr:
            render = partial(render_drr_pair, spacing_dhw=ref_spacing, geometry=pair.geometry or geometry, window=window)
            row.update(metrics.reprojection_metrics(pred, ap, lat, render, name=case))
        if feature_extractor is not None:
            feats_pred.append(metrics.extract_features(pred[None], feature_extractor))
            feats_ref.append(metrics.extract_features(ref[None], feature_extractor))
        if figures:
            std = None
            if pair.std is not None:
                std_hu, _ = image_to_volume(read_ct(pair.std, check=False))
                _check_nifti_finite(pair.std, f"{case} uncertainty")
                if std_hu.shape != pred.shape or float(std_hu.min()) < 0:
                    raise ValueError(
                        f"{case} uncertainty {pair.std} has shape {tuple(std_hu.shape[1:])} and minimum "
                        f"{float(std_hu.min()):g}; expected a non-negative standard deviation in HU of shape "
                        f"{tuple(pred.shape[1:])}"
                    )
                std = std_hu.float() / (window.width / 2.0)  # HU -> [-1, 1] units (figures' convention)
            images[pair.subject_id] = mpr_figure(pred, ref, window=window, uncertainty=std, ap=ap, lat=lat,
                                                 spacing=ref_spacing, title=pair.subject_id)
        rows.append(row)

    keys = list(VOLUME_KEYS) + (list(ANATOMY_KEYS) if with_anatomy else []) + (list(DRR_KEYS) if with_drr else [])
    summary: dict = {
        "n_cases": len(rows),
        "window": window.to_dict(),
        "metrics": {k: _summarise([r[k] for r in rows]) for k in keys},
        "feature_metrics": _feature_metrics(feats_pred, feats_ref, fid_min_samples),
        "definitions": _definitions(window, with_drr, with_anatomy),
    }
    if with_drr:
        summary["drr_geometry"] = geometry.to_dict()
    if figures:
        summary["_figures"] = images
    return rows, summary


def _feature_metrics(feats_pred: list[torch.Tensor], feats_ref: list[torch.Tensor],
                     fid_min_samples: int | None) -> dict:
    if not feats_pred:
        return {"fid": None, "mmd": None, "note": "not computed: no MedicalNet weights given"}
    fp, fr = torch.cat(feats_pred), torch.cat(feats_ref)
    out: dict = {
        "extractor": "MedicalNet ResNet-10 (23 datasets), deepest stage, global average pooled, per-volume z-score",
        "n_features": int(fp.shape[1]),
        "n_samples": int(fp.shape[0]),
        "fid_definition": "|mu_p - mu_r|^2 + tr(S_p + S_r - 2 (S_p S_r)^(1/2)) (monai FIDMetric)",
        "mmd_definition": "unbiased MMD^2 with a linear kernel on the features (monai MMDMetric)",
    }
    try:
        out["fid"] = metrics.fid(fp, fr, min_samples=fid_min_samples)
    except ValueError as e:
        if "FID needs at least" not in str(e):
            raise
        out["fid"], out["fid_note"] = None, f"not computed: {e}"
    try:
        out["mmd"] = metrics.mmd(fp, fr)
    except ValueError as e:
        if "MMD needs" not in str(e):
            raise
        out["mmd"], out["mmd_note"] = None, f"not computed: {e}"
    return out


def _jsonable(obj):
    """Non-finite floats -> the strings "inf" / "-inf" / "nan" (strict JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_results(out_dir: str | os.PathLike, rows: Sequence[dict], summary: dict, overwrite: bool = False) -> Path:
    """Write ``per_case.csv``, ``summary.json`` and any figures atomically into ``out_dir``.

    Args:
        out_dir: output folder (created).
        rows: per-case rows from :func:`evaluate_pairs`.
        summary: its summary (``"_figures"`` entries become ``figures/<id>.png``).
        overwrite: replace existing results (figure PNGs of an earlier run that this run did not draw are
            removed); otherwise a non-empty ``out_dir`` raises ``FileExistsError``.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; expected an output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: output folder exists and is not empty; pass --overwrite to replace it")
    summary = dict(summary)
    figures = summary.pop("_figures", {})
    for sid, image in figures.items():
        buf = io.BytesIO()
        matplotlib.image.imsave(buf, image, format="png")
        with atomic_write(out / FIGURE_DIR / f"{sid}.png", "wb") as f:
            f.write(buf.getvalue())
    if (out / FIGURE_DIR).is_dir():  # figures of an overwritten earlier run would not match these results
        for stale in (out / FIGURE_DIR).glob("*.png"):
            if stale.stem not in figures:
                stale.unlink()
    atomic_write_text(out / PER_CASE_FILE, pd.DataFrame(list(rows)).to_csv(index=False))
    atomic_write_json(out / SUMMARY_FILE, _jsonable(summary))  # last: its presence marks a complete run
    return out


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--pred", required=True, help="folder of generated <subject_id>.nii.gz volumes in HU")
    p.add_argument("--ref", required=True, help="folder of reference <subject_id>.nii.gz CTs, or a manifest.csv")
    p.add_argument("--split", default=None, help="manifest split to evaluate (default test; manifest only)")
    p.add_argument("--hu-min", type=number(float), default=None, help="HU window low end (default: dataset.json, else -1000)")
    p.add_argument("--hu-max", type=number(float), default=None, help="HU window high end (default: dataset.json, else 1000)")
    p.add_argument("--geometry", default=None,
                   help="dataset.json (or its folder) with the DRR geometry; default the manifest's dataset.json")
    p.add_argument("--xray-dir", default=None, help="folder with <subject_id>/AP.pt and LAT.pt (default: manifest)")
    p.add_argument("--medicalnet-weights", default=None, help="MedicalNet resnet_10_23dataset.pth for FID/MMD")
    p.add_argument("--fid-min-samples", type=number(int, min=2), default=None,
                   help="minimum cases for FID (default features + 1)")
    p.add_argument("--figures", action="store_true", help="also write an MPR figure per case to OUT/figures/")
    p.add_argument("--out", required=True, help="output folder for per_case.csv and summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _dataset_info(args: argparse.Namespace) -> DatasetInfo | None:
    if args.geometry is not None:
        return DatasetInfo.load(args.geometry)
    ref = Path(args.ref)
    if ref.is_file() and (ref.parent / "dataset.json").is_file():
        return DatasetInfo.load(ref.parent)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> None:
    """Evaluate the generated volumes the arguments name and write the results (see the module docstring)."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out}: output exists and is not empty; pass --overwrite to replace it")
    check_writable(out / "summary.json", "evaluation results")  # also refuses an --out that is a file
    if (args.hu_min is None) != (args.hu_max is None):
        raise ValueError(f"--hu-min {args.hu_min} / --hu-max {args.hu_max}: give both or neither")
    info = _dataset_info(args)
    if args.hu_min is not None:
        window = HUWindow(args.hu_min, args.hu_max)
    else:
        window = info.window if info is not None else HUWindow()
    pairs = find_pairs(args.pred, args.ref, split=args.split, xray_dir=args.xray_dir)
    have_xrays = all(p.ap is not None and p.lat is not None for p in pairs)
    geometry = info.geometry if info is not None and have_xrays else None
    if args.xray_dir is not None and geometry is None:
        raise ValueError(f"--xray-dir {args.xray_dir} given but no DRR geometry: pass --geometry dataset.json")
    if args.geometry is not None and not have_xrays:
        raise ValueError(f"--geometry {args.geometry} given but the cases have no X-rays: pass --xray-dir")
    extractor = None
    if args.medicalnet_weights is not None:
        from AutoEncoder.medicalnet import load_medicalnet

        extractor = load_medicalnet(args.medicalnet_weights)
    rows, summary = evaluate_pairs(pairs, window, geometry, extractor, args.fid_min_samples,
                                   figures=args.figures, progress=not args.no_progress)
    summary["inputs"] = {"pred": str(Path(args.pred).resolve()), "ref": str(Path(args.ref).resolve()),
                         "split": (args.split or "test") if Path(args.ref).is_file() else None}
    write_results(out, rows, summary, overwrite=args.overwrite)
    fm = summary["feature_metrics"]
    if fm.get("fid_note"):
        print(f"{PROG}: warning: FID {fm['fid_note']}", file=sys.stderr)
    m = summary["metrics"]
    print(json.dumps(_jsonable({k: m[k]["mean"] for k in m} | {"n_cases": summary["n_cases"], "out": str(out)})))


if __name__ == "__main__":
    sys.exit(main())
