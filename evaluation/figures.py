"""Multi-planar reconstruction (MPR) figures: ground truth, generated, |error| and uncertainty.

Rows (present when their input is given): ground truth, generated, absolute error in HU, per-voxel
standard deviation in HU. Columns: the input X-rays (AP above, lateral below) when given, then axial,
coronal and sagittal slices. Volumes use the project layout ``(D, H, W)`` = superior -> inferior,
anterior -> posterior, patient right -> left, so plain ``imshow`` gives the radiological views: axial
with anterior at the top and patient right on the viewer's left, coronal and sagittal with superior at
the top (sagittal: anterior on the left). Yellow letters on the first row and the X-rays mark the
anatomical direction at the top and left edges (A/P, S/I, R/L).

Figures are drawn with a ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot global state, safe
in data-loader workers and training callbacks). :func:`mpr_figure` returns an ``(H, W, 3)`` uint8 array
(TensorBoard: ``add_image(tag, img, step, dataformats="HWC")``); :func:`save_mpr_figure` writes that
same array as a PNG atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dataset.intensity import HUWindow
from dataset.io import atomic_write
from evaluation.metrics import check_finite

__all__ = ["mpr_figure", "save_mpr_figure"]

_PLANES = ("axial", "coronal", "sagittal")
#: Anatomical direction at the (top, left) edge of each panel: axial, coronal, sagittal, AP, LAT.
_MARKERS = {"axial": ("A", "R"), "coronal": ("S", "R"), "sagittal": ("S", "A"), "AP": ("S", "R"), "LAT": ("S", "A")}


def _mark(ax, plane: str) -> None:
    """Small orientation letters at the top and left edges of an image panel."""
    top, left = _MARKERS[plane]
    style = {"transform": ax.transAxes, "color": "yellow", "fontsize": 6, "fontweight": "bold"}
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
_DPI = 100


def _as_dhw(x: torch.Tensor, name: str) -> torch.Tensor:
    """A single volume as float ``(D, H, W)``; accepts ``(D, H, W)``, ``(1, D, H, W)``, ``(1, 1, D, H, W)``."""
    if x.ndim < 3 or x.ndim > 5 or any(s != 1 for s in x.shape[:-3]):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected one volume (1, D, H, W) or (D, H, W)")
    x = x.detach().cpu().reshape(x.shape[-3:]).float()
    check_finite(x, name)
    return x


def _as_hw(x: torch.Tensor, name: str) -> np.ndarray:
    """An X-ray as ``(H, W)`` numpy; accepts ``(H, W)``, ``(1, H, W)``, ``(1, 1, H, W)``."""
    if x.ndim < 2 or x.ndim > 4 or any(s != 1 for s in x.shape[:-2]):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected one X-ray (1, H, W) or (H, W)")
    x = x.detach().cpu().reshape(x.shape[-2:]).float()
    check_finite(x, name)
    return x.numpy()


def _slices(vol: torch.Tensor, idx: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial ``(H, W)``, coronal ``(D, W)`` and sagittal ``(D, H)`` slices through ``idx = (d, h, w)``."""
    d, h, w = idx
    return [vol[d].numpy(), vol[:, h, :].numpy(), vol[:, :, w].numpy()]


def mpr_figure(
    pred: torch.Tensor,
    gt: torch.Tensor | None = None,
    *,
    window: HUWindow | None = None,
    uncertainty: torch.Tensor | None = None,
    ap: torch.Tensor | None = None,
    lat: torch.Tensor | None = None,
    indices: Sequence[int] | None = None,
    display_window: tuple[float, float] | None = None,
    error_max_hu: float | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    panel_px: int = 200,
) -> np.ndarray:
    """Draw an MPR figure and return it as an RGB image.

    Args:
        pred: generated volume ``(1, D, H, W)`` (or ``(D, H, W)``) in [-1, 1].
        gt: ground-truth volume, same shape, in [-1, 1]; adds the ground-truth and |error| rows.
        window: HU window of the [-1, 1] mapping (``dataset.intensity.HUWindow``); default [-1000, 1000].
        uncertainty: per-voxel standard deviation over samples, same shape, in [-1, 1] units (shown in
            HU: a standard deviation scales with the window's slope, width / 2 HU per unit).
        ap: input AP X-ray ``(1, H, W)`` in [0, 1] (rows superior -> inferior, columns right -> left).
        lat: input lateral X-ray ``(1, H, W)`` in [0, 1] (columns anterior -> posterior).
        indices: slice indices ``(d, h, w)`` for the axial, coronal and sagittal planes; default centre.
        display_window: HU range ``(low, high)`` mapped to black..white for the CT rows; default ``window``.
        error_max_hu: top of the |error| colour scale in HU; default the 99.5th percentile of the shown
            error (at least 1 HU). The uncertainty row scales the same way.
        spacing: voxel spacing in mm along ``(D, H, W)`` for correct aspect ratios.
        title: optional figure title.
        panel_px: size of one panel in pixels.

    Returns:
        ``(rows * panel_px, cols * panel_px, 3)`` uint8 RGB array, rows = 1-4 volume rows (at least 2
        when X-rays are given), cols = 3 planes + 1 when X-rays are given.
    """
    window = window or HUWindow()
    vols: dict[str, torch.Tensor] = {"generated": _as_dhw(pred, "generated volume")}
    if gt is not None:
        vols = {"ground truth": _as_dhw(gt, "ground-truth volume"), **vols}
    shape = vols["generated"].shape
    for key, v in vols.items():
        if v.shape != shape:
            raise ValueError(f"{key} volume has shape {tuple(v.shape)}; expected {tuple(shape)} like the generated one")
    if indices is None:
        idx = tuple(s // 2 for s in shape)
    else:
        idx = tuple(int(i) for i in indices)
        if len(idx) != 3 or any(not 0 <= i < s for i, s in zip(idx, shape)):
            raise ValueError(f"indices={tuple(indices)} are invalid; expected (d, h, w) inside {tuple(shape)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={tuple(spacing)} is invalid; expected three positive mm values (D, H, W)")
    if panel_px < 50:
        raise ValueError(f"panel_px={panel_px}; expected >= 50")
    lo, hi = display_window if display_window is not None else (window.hu_min, window.hu_max)
    if not hi > lo:
        raise ValueError(f"display_window=({lo}, {hi}) is invalid; expected low < high")

    # (label, slices, cmap, vmin, vmax, colourbar label)
    rows: list[tuple[str, list[np.ndarray], str, float, float, str]] = []
    hu = {k: window.to_hu(v) for k, v in vols.items()}
    for key in vols:
        rows.append((key, _slices(hu[key], idx), "gray", lo, hi, "HU"))
    heat: list[tuple[str, list[np.ndarray]]] = []
    if gt is not None:
        heat.append(("|error|", _slices((hu["generated"] - hu["ground truth"]).abs(), idx)))
    if uncertainty is not None:
        std = _as_dhw(uncertainty, "uncertainty volume")
        if std.shape != shape:
            raise ValueError(f"uncertainty volume has shape {tuple(std.shape)}; expected {tuple(shape)}")
        if float(std.min()) < 0:
            raise ValueError("uncertainty volume has negative values; expected a per-voxel standard deviation")
        heat.append(("std", _slices(std * (window.width / 2.0), idx)))
    for label, sl in heat:
        vmax = error_max_hu
        if vmax is None:
            vmax = max(float(np.percentile(np.concatenate([s.ravel() for s in sl]), 99.5)), 1.0)
        rows.append((label, sl, "magma", 0.0, float(vmax), f"{label} (HU)"))

    xrays = [(n, _as_hw(x, f"{n} X-ray")) for n, x in (("AP", ap), ("LAT", lat)) if x is not None]
    n_cols = 3 + (1 if xrays else 0)
    n_rows = max(len(rows), len(xrays))
    fig = Figure(figsize=(n_cols * panel_px / _DPI, n_rows * panel_px / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    sd, sh, sw = (float(s) for s in spacing)
    aspects = (sh / sw, sd / sw, sd / sh)  # axial (H, W), coronal (D, W), sagittal (D, H)
    c0 = 1 if xrays else 0
    for r, (name, xray) in enumerate(xrays):
        ax = axes[r, 0]
        ax.imshow(xray, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"input {name}", fontsize=8)
        _mark(ax, name)
    for r, (label, sl, cmap, vmin, vmax, cbar_label) in enumerate(rows):
        for c, (plane, img, aspect) in enumerate(zip(_PLANES, sl, aspects)):
            ax = axes[r, c0 + c]
            im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            if r == 0:
                ax.set_title(f"{plane} ({('d', 'h', 'w')[c]}={idx[c]})", fontsize=7)
                _mark(ax, plane)
        axes[r, c0].text(-0.04, 0.5, label, transform=axes[r, c0].transAxes, rotation=90,
                         ha="right", va="center", fontsize=7)
        if cmap != "gray" or r == 0:
            cb = fig.colorbar(im, ax=axes[r, c0 + 2], fraction=0.08, pad=0.02)
            cb.set_label(cbar_label, fontsize=7)
            cb.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def save_mpr_figure(path: str | os.PathLike, pred: torch.Tensor, gt: torch.Tensor | None = None, **kwargs) -> Path:
    """Draw :func:`mpr_figure` and write it as a PNG atomically.

    Args:
        path: destination ``.png``; parent folders are created.
        pred: generated volume ``(1, D, H, W)`` in [-1, 1].
        gt: ground-truth volume or ``None``.
        **kwargs: keyword arguments of :func:`mpr_figure`.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: expected a .png file name")
    image = mpr_figure(pred, gt, **kwargs)
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, image, format="png")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return path
