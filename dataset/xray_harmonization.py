"""Inference-time intensity harmonisation: match a radiograph's grey levels to the training X-rays'.

The training X-rays of a model (DRRs) follow one fixed intensity map; a clinical radiograph has been
through an unknown, roughly monotone processing curve (exposure, gamma, display LUT). For each view,
:class:`IntensityReference` keeps quantile functions of the training images (means of the per-image
quantile functions: their 1-D Wasserstein barycentres) of the whole field and of the *body* region,
and the air level. :meth:`IntensityReference.match`:

1. ranks the pixels that show the patient (padding and collimator areas do not count) and gives them
   the whole-field reference quantiles; this image does not change under any monotone distortion;
2. finds the body in it (Otsu threshold), so the body mask does not depend on the distortion either
   (an Otsu threshold on the input itself moves with gamma and window);
3. maps the input's body quantiles onto the reference body quantiles with one monotone
   piecewise-linear curve (air maps to the training air level).

The body map adapts to the subject (a larger body keeps its own share of the field), so a clean DRR
changes little, and a monotone distortion of a DRR (gamma, window, sigmoid LUT, exposure) is undone up
to the subject's own differences from the training mean.

The reference is computed from the training split when BiFlowNet training starts
(:meth:`IntensityReference.from_manifest`) and stored in the checkpoint as a plain dict
(:meth:`to_dict`), so generation finds it with the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dataset.drr import VIEWS

#: Quantile levels of the body region kept per view (0 and 1 are the body's minimum and maximum).
LEVELS = tuple(round(i / 100, 2) for i in range(101))
#: Fewest body pixels for a usable quantile function.
MIN_BODY_PIXELS = 16
#: Largest side of the mean training image kept for previews.
MEAN_IMAGE_SIZE = 32


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D set of values (the split that maximises the between-class variance)."""
    v = values.detach().double().flatten()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(hist, 0)
    w1 = w0[-1] - w0
    m0 = torch.cumsum(hist * centres, 0)
    mean0 = m0 / w0.clamp_min(1e-12)
    mean1 = (m0[-1] - m0) / w1.clamp_min(1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    k = int(torch.argmax(between[:-1]))
    return float(lo + (k + 1) * (hi - lo) / bins)


def body_mask(image: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Pixels of the body: above the Otsu threshold of the valid pixels.

    Args:
        image: ``(1, H, W)`` in [0, 1].
        valid: bool ``(1, H, W)`` pixels that show the patient (default all).

    Returns:
        (bool mask ``(1, H, W)``, threshold).
    """
    valid = torch.ones_like(image, dtype=torch.bool) if valid is None else valid.bool()
    inside = image[valid]
    if inside.numel() < MIN_BODY_PIXELS:
        raise ValueError(f"only {inside.numel()} pixels show the patient; expected at least {MIN_BODY_PIXELS}")
    t = otsu_threshold(inside)
    return valid & (image > t), t


def _small(image: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    """``(1, H, W)`` -> nested rows, area-reduced to at most :data:`MEAN_IMAGE_SIZE` per side, 4 decimals."""
    h, w = image.shape[-2:]
    scale = max(h, w) / MEAN_IMAGE_SIZE
    if scale > 1:
        size = (max(2, round(h / scale)), max(2, round(w / scale)))
        image = torch.nn.functional.interpolate(image[None].float(), size=size, mode="area")[0]
    return tuple(tuple(round(float(v), 4) for v in row) for row in image[0])


def _rows(value) -> tuple[tuple[float, ...], ...] | None:
    if value is None:
        return None
    rows = tuple(tuple(float(v) for v in row) for row in value)
    if len({len(r) for r in rows}) != 1:
        raise ValueError("the stored mean training image is not rectangular")
    return rows


def _quantiles(values: torch.Tensor) -> np.ndarray:
    return np.quantile(values.detach().double().numpy(), LEVELS)


def _increasing(x: np.ndarray) -> np.ndarray:
    """``x`` made strictly increasing (ties get tiny steps), for interpolation."""
    x = np.maximum.accumulate(np.asarray(x, dtype=np.float64))
    span = max(float(x[-1] - x[0]), 1e-6)
    return x + np.arange(len(x)) * 1e-9 * span


@dataclass(frozen=True)
class ViewIntensity:
    """Training intensity statistics of one view.

    Args:
        quantiles: body quantiles at :data:`LEVELS` (mean over the images).
        field: whole-field quantiles at :data:`LEVELS` (mean over the images).
        air: median of the non-body pixels (mean over the images).
        images: how many images were summarised.
        mean_image: the mean training image (rows of values in [0, 1], at most :data:`MEAN_IMAGE_SIZE`
            per side), for previews; None when the images differ in size.
    """

    quantiles: tuple[float, ...]
    field: tuple[float, ...]
    air: float
    images: int
    mean_image: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        for values in (self.quantiles, self.field):
            q = np.asarray(values, dtype=np.float64)
            if q.shape != (len(LEVELS),) or not np.isfinite(q).all() or (np.diff(q) < -1e-9).any():
                raise ValueError(f"intensity quantiles must be {len(LEVELS)} finite non-decreasing numbers; got {values!r}")
        if not np.isfinite(self.air):
            raise ValueError(f"air level {self.air!r} is not finite")


@dataclass(frozen=True)
class IntensityReference:
    """Per-view body intensity statistics of a model's training X-rays (see the module docstring)."""

    views: Mapping[str, ViewIntensity]

    @classmethod
    def from_images(cls, images: Mapping[str, Sequence[torch.Tensor]]) -> "IntensityReference":
        """Summarise ``{"AP": [(1, H, W), ...], "LAT": [...]}`` images in [0, 1]."""
        views = {}
        for view in VIEWS:
            qs, fields, airs = [], [], []
            shapes = {tuple(image.shape) for image in images.get(view, ())}
            for image in images.get(view, ()):
                body, _ = body_mask(image)
                if int(body.sum()) < MIN_BODY_PIXELS:
                    continue
                qs.append(_quantiles(image[body]))
                fields.append(_quantiles(image))
                rest = image[~body]
                airs.append(float(rest.median()) if rest.numel() else 0.0)
            if not qs:
                raise ValueError(f"no usable {view} image to summarise (each needs a body region)")
            mean = None
            if len(shapes) == 1:
                mean = _small(torch.stack(list(images[view])).mean(0))
            views[view] = ViewIntensity(tuple(float(v) for v in np.mean(qs, axis=0)),
                                        tuple(float(v) for v in np.mean(fields, axis=0)), float(np.mean(airs)), len(qs), mean)
        return cls(views)

    @classmethod
    def from_manifest(cls, manifest: str | os.PathLike, split: str = "train", limit: int = 256) -> "IntensityReference":
        """Summarise the X-rays of one split of a prepared manifest (at most ``limit`` subjects, evenly spaced)."""
        from dataset.manifest import Manifest
        from dataset.radiograph import read_radiograph

        frame = Manifest.load(manifest).split(split)
        if len(frame) == 0:
            raise ValueError(f"{manifest}: no {split!r} subjects to take X-ray intensity statistics from")
        rows = frame.iloc[np.unique(np.linspace(0, len(frame) - 1, min(limit, len(frame))).round().astype(int))]
        return cls.from_images({view: [read_radiograph(p).image for p in rows[view.lower()]] for view in VIEWS})

    def to_dict(self) -> dict:
        """Plain dict (stored in checkpoints)."""
        return {"levels": list(LEVELS),
                **{view: {"quantiles": list(v.quantiles), "field": list(v.field), "air": v.air, "images": v.images,
                          "mean_image": [list(r) for r in v.mean_image] if v.mean_image is not None else None}
                   for view, v in self.views.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "IntensityReference":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, Mapping):
            raise ValueError(f"X-ray intensity statistics {d!r} are not a mapping")
        if [round(float(v), 4) for v in d.get("levels", [])] != list(LEVELS):
            raise ValueError("X-ray intensity statistics use other quantile levels; expected 0, 0.01, ..., 1")
        try:
            return cls({view: ViewIntensity(tuple(float(q) for q in d[view]["quantiles"]),
                                            tuple(float(q) for q in d[view]["field"]), float(d[view]["air"]),
                                            int(d[view]["images"]), _rows(d[view].get("mean_image"))) for view in VIEWS})
        except (KeyError, TypeError) as e:
            raise ValueError(f"X-ray intensity statistics lack {e} (expected AP and LAT quantiles, field, air, "
                             "images)") from None

    def match(self, image: torch.Tensor, view: str, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """Map ``image``'s body quantiles onto this reference's (monotone, piecewise linear).

        Args:
            image: ``(1, H, W)`` in [0, 1] on the model's detector grid.
            view: ``"AP"`` or ``"LAT"``.
            valid: bool ``(1, H, W)``: pixels that show the patient (others stay 0).

        Returns:
            (harmonised image ``(1, H, W)`` in [0, 1], one-line description of what was done).
        """
        if view not in self.views:
            raise ValueError(f"view={view!r} is invalid; expected one of {sorted(self.views)}")
        ref = self.views[view]
        valid = torch.ones_like(image, dtype=torch.bool) if valid is None else valid.bool()
        if int(valid.sum()) < MIN_BODY_PIXELS:
            return image, f"harmonisation skipped: only {int(valid.sum())} pixels show the patient"
        ranked = torch.zeros_like(image, dtype=torch.float64)  # the reference's whole-field values, by rank
        inside = image[valid].double().numpy()
        q_field = _increasing(np.quantile(inside, LEVELS))
        ranked[valid] = torch.from_numpy(np.interp(inside, q_field, ref.field))
        body, threshold = body_mask(ranked.to(image.dtype), valid)
        n = int(body.sum())
        if n < MIN_BODY_PIXELS:
            return image, f"harmonisation skipped: only {n} body pixels"
        q_in = _quantiles(image[body])
        rest = image[valid & ~body]
        air_in = float(rest.median()) if rest.numel() else 0.0
        air_in = min(air_in, float(q_in[0]) - 1e-6)
        xp = _increasing(np.concatenate([[air_in], q_in]))
        fp = np.maximum.accumulate(np.concatenate([[min(ref.air, ref.quantiles[0])], ref.quantiles]))
        x = image.detach().double().numpy()
        # below the air level keep the offset from it (noise in air), above the body's maximum keep the last slope
        out = np.interp(x, xp, fp)
        below = x < xp[0]
        out[below] = fp[0] + (x[below] - xp[0])
        out = torch.from_numpy(out).to(image.dtype).clamp(0.0, 1.0)
        out = torch.where(valid, out, torch.zeros((), dtype=image.dtype))
        step = (f"harmonised {view} to the training X-rays: body ({100 * n / valid.sum():.0f} % of the field) quantiles 5/50/95 % {q_in[5]:.3f}/{q_in[50]:.3f}/{q_in[95]:.3f} -> "
                f"{ref.quantiles[5]:.3f}/{ref.quantiles[50]:.3f}/{ref.quantiles[95]:.3f}")
        return out, step


__all__ = ["IntensityReference", "LEVELS", "MEAN_IMAGE_SIZE", "ViewIntensity", "body_mask", "otsu_threshold"]
