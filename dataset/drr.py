"""Cone-beam digitally reconstructed radiographs (AP + lateral) with diffdrr, and their geometry.

Geometry (all in mm, in a frame centred on the volume centre, axes along our ``(D, H, W)`` layout:
``z`` superior -> inferior, ``y`` anterior -> posterior, ``x`` patient right -> left). Each view has
its own :class:`ViewGeometry`; :class:`DRRGeometry` is the pair plus the intensity scale.

- **AP** (nominal): point source at ``y = -sid`` (in front of the patient), flat detector at
  ``y = sdd - sid`` (behind). Detector rows run superior -> inferior (``+z``), columns patient
  right -> left (``+x``), so the image shows like a frontal chest radiograph (patient's right on the
  viewer's left). ``reversed=True`` is a PA exposure: source behind (``y = +sid``), detector in front;
  the image keeps the same display orientation.
- **LAT** (nominal, left lateral): source at ``x = -sid`` (patient's right), detector at
  ``x = sdd - sid`` (left). Rows superior -> inferior, columns anterior -> posterior (``+y``): the
  patient faces left. ``reversed=True`` puts the source on the patient's left (right lateral), same
  display orientation.
- ``angle`` (degrees) rotates source and detector together about the superior-inferior (``z``) axis,
  away from the nominal direction: a point ``(y, x)`` is seen as ``(y cos a + x sin a,
  -y sin a + x cos a)`` in the view frame (a small deviation from a true AP / 90-degree lateral).
- The central ray passes through the isocentre (the volume centre) and hits the detector at its
  principal point; ``offset`` ``(row, col)`` (mm) is where the detector centre lies relative to that
  point. Pixel ``(r, c)`` of an ``R x C`` detector with pitch ``(pr, pc)`` sits at
  ``((r - (R - 1) / 2) pr + offset_row, (c - (C - 1) / 2) pc + offset_col)`` on the plane.

Intensity: HU (from the window) become water-relative attenuation ``mu = max(0, 1 + HU / 1000)``;
diffdrr's Siddon ray tracer integrates it along each ray, giving the water-equivalent path length
``L`` in mm; the stored image is ``1 - exp(-L / wet_scale_mm)``, in [0, 1), brighter = more
attenuation (like a radiograph). The map is fixed (never per-image), so DRRs of generated volumes
are directly comparable with the inputs, and ``L = -wet_scale_mm * log(1 - x)`` recovers the path.

The projection maths lives in :func:`project_points`, written on tensors of packed view parameters
(:meth:`ViewGeometry.to_tensor`) so that DRR rendering checks, evaluation and the network's
per-sample projection grids all use the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from einops import rearrange

from dataset.intensity import HUWindow

VIEWS = ("AP", "LAT")
#: Order of the packed view parameters (:meth:`ViewGeometry.to_tensor`, :func:`project_points`).
VIEW_PARAMS = ("sdd", "sid", "rows", "cols", "pitch_row", "pitch_col", "offset_row", "offset_col", "angle", "reversed")
#: Largest accepted deviation from the nominal view direction (degrees).
MAX_ANGLE = 45.0


def _pair(value, name: str, kind: type) -> tuple:
    values = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 2:
        raise ValueError(f"{name}={value!r} is invalid; expected one number or a (row, col) pair")
    try:
        return tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is invalid; expected numbers") from None


def _finite(value: float) -> bool:
    return math.isfinite(value)


@dataclass(frozen=True)
class ViewGeometry:
    """Cone-beam geometry of one view (see the module docstring for the frame and conventions).

    Args:
        sdd: source-to-detector distance, mm.
        sid: source-to-isocentre (volume centre) distance, mm; less than ``sdd``.
        detector_size: detector pixels ``(rows, cols)`` (an int means square).
        pixel_spacing: detector pixel pitch ``(row, col)`` in mm at the detector (a number means square).
        offset: detector centre relative to the principal point ``(row, col)``, mm.
        angle: rotation about the superior-inferior axis away from the nominal view, degrees, within
            +-``MAX_ANGLE``.
        reversed: source on the opposite side (PA for the AP view, right lateral for LAT).
    """

    sdd: float = 1500.0
    sid: float = 1000.0
    detector_size: tuple[int, int] = (256, 256)
    pixel_spacing: tuple[float, float] = (2.0, 2.0)
    offset: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    reversed: bool = False

    def __post_init__(self) -> None:
        size = _pair(self.detector_size, "detector_size", int)
        if min(size) < 2:
            raise ValueError(f"detector_size={self.detector_size!r} is invalid; expected (rows, cols) >= 2")
        object.__setattr__(self, "detector_size", size)
        pitch = _pair(self.pixel_spacing, "pixel_spacing", float)
        if not all(_finite(p) and p > 0 for p in pitch):
            raise ValueError(f"pixel_spacing={self.pixel_spacing!r} is invalid; expected positive finite mm")
        object.__setattr__(self, "pixel_spacing", pitch)
        offset = _pair(self.offset, "offset", float)
        if not all(_finite(o) for o in offset):
            raise ValueError(f"offset={self.offset!r} is invalid; expected finite mm")
        object.__setattr__(self, "offset", offset)
        for name in ("sdd", "sid"):
            v = getattr(self, name)
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; expected a positive number (mm)") from None
            if not (_finite(v) and v > 0):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; expected a positive number (mm)")
            object.__setattr__(self, name, v)
        if self.sdd <= self.sid:
            raise ValueError(f"sdd={self.sdd} must exceed sid={self.sid} (the detector lies beyond the isocentre)")
        angle = float(self.angle)
        if not (_finite(angle) and abs(angle) <= MAX_ANGLE):
            raise ValueError(f"angle={self.angle!r} is invalid; expected a deviation within +-{MAX_ANGLE:g} degrees")
        object.__setattr__(self, "angle", angle)
        object.__setattr__(self, "reversed", bool(self.reversed))

    @property
    def magnification(self) -> float:
        """Magnification at the isocentre, ``sdd / sid``."""
        return self.sdd / self.sid

    @property
    def isocentre_pitch(self) -> tuple[float, float]:
        """Pixel pitch ``(row, col)`` projected back to the isocentre plane, mm."""
        return (self.pixel_spacing[0] / self.magnification, self.pixel_spacing[1] / self.magnification)

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return {"sdd": self.sdd, "sid": self.sid, "detector_size": list(self.detector_size),
                "pixel_spacing": list(self.pixel_spacing), "offset": list(self.offset), "angle": self.angle,
                "reversed": self.reversed}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewGeometry":
        """Inverse of :meth:`to_dict` (``offset``, ``angle`` and ``reversed`` are optional)."""
        if not isinstance(d, dict):
            raise ValueError(f"view geometry {d!r} is not a mapping")
        missing = [k for k in ("sdd", "sid", "detector_size", "pixel_spacing") if k not in d]
        if missing:
            raise ValueError(f"view geometry {d!r} lacks {missing}")
        unknown = sorted(set(d) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(f"view geometry {d!r} has unknown keys {unknown}")
        return cls(**d)

    def to_tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The parameters packed in :data:`VIEW_PARAMS` order, shape ``(len(VIEW_PARAMS),)``."""
        return torch.tensor([self.sdd, self.sid, *self.detector_size, *self.pixel_spacing, *self.offset,
                             self.angle, float(self.reversed)], dtype=dtype)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ViewGeometry":
        """Inverse of :meth:`to_tensor`."""
        v = [float(x) for x in t.reshape(-1).tolist()]
        if len(v) != len(VIEW_PARAMS):
            raise ValueError(f"packed view geometry has {len(v)} values, expected {len(VIEW_PARAMS)} ({VIEW_PARAMS})")
        return cls(v[0], v[1], (round(v[2]), round(v[3])), (v[4], v[5]), (v[6], v[7]), v[8], v[9] > 0.5)


def _check_view(view: str) -> str:
    if view not in VIEWS:
        raise ValueError(f"view={view!r} is invalid; expected one of {VIEWS}")
    return view


def _view_axes(view: str, angle: torch.Tensor, reversed_: torch.Tensor):
    """Unit vectors (z, y, x components) of the view's depth (source -> detector) and column axes."""
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    sign = 1.0 - 2.0 * reversed_  # -1 when the source is on the other side
    # nominal AP: depth +y, columns +x; nominal LAT: depth +x, columns +y; both rotated by `angle` about z
    if view == "AP":
        depth = torch.stack([zero, cos, sin], dim=-1) * sign[..., None]
        col = torch.stack([zero, -sin, cos], dim=-1)
    else:
        depth = torch.stack([zero, -sin, cos], dim=-1) * sign[..., None]
        col = torch.stack([zero, cos, sin], dim=-1)
    return depth, col


def project_points(points: torch.Tensor, view: str, params: torch.Tensor) -> torch.Tensor:
    """Detector position of points for one view, as ``F.grid_sample`` coordinates.

    Args:
        points: ``(..., N, 3)`` positions ``(z, y, x)`` in mm in the volume-centred frame.
        view: ``"AP"`` or ``"LAT"``.
        params: ``(..., len(VIEW_PARAMS))`` packed view geometries (:meth:`ViewGeometry.to_tensor`);
            leading dimensions broadcast with ``points``'.

    Returns:
        ``(..., N, 2)`` in the dtype of ``points``: ``(x, y)`` = (column, row) of the detector
        normalised to [-1, 1] with ``align_corners=False`` (outside means off the detector).
    """
    _check_view(view)
    p = params.to(points.dtype)
    sdd, sid, rows, cols, pr, pc, off_r, off_c, angle, rev = p.unbind(-1)
    depth_axis, col_axis = _view_axes(view, angle, rev)
    depth = (points * depth_axis[..., None, :]).sum(-1)  # (..., N) distance beyond the isocentre
    lateral = (points * col_axis[..., None, :]).sum(-1)
    mag = sdd[..., None] / (sid[..., None] + depth)  # cone-beam magnification of each point
    u = points[..., 0] * mag - off_r[..., None]  # mm on the detector plane, from the detector centre
    v = lateral * mag - off_c[..., None]
    return torch.stack([2 * v / (cols[..., None] * pc[..., None]), 2 * u / (rows[..., None] * pr[..., None])], dim=-1)


def voxel_centres(shape_dhw: tuple[int, int, int], spacing_dhw: tuple[float, float, float],
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """``(D, H, W, 3)`` voxel centre positions ``(z, y, x)`` in mm, centred on the volume centre."""
    axes = [(torch.arange(n, dtype=dtype, device=device) - (n - 1) / 2) * s for n, s in zip(shape_dhw, spacing_dhw)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


@dataclass(frozen=True)
class DRRGeometry:
    """Geometry of an AP + lateral pair and the intensity scale of its images.

    Build one with :meth:`uniform` (both views alike, the usual case), :meth:`fit` (a detector that
    shows the whole volume) or directly from two :class:`ViewGeometry`.

    Args:
        ap: geometry of the AP (or PA) view.
        lat: geometry of the lateral view.
        wet_scale_mm: water-equivalent path (mm) that maps to ``1 - 1/e``; sets the image contrast.
    """

    ap: ViewGeometry = field(default_factory=ViewGeometry)
    lat: ViewGeometry = field(default_factory=ViewGeometry)
    wet_scale_mm: float = 250.0

    def __post_init__(self) -> None:
        for name in VIEWS:
            v = getattr(self, name.lower())
            if not isinstance(v, ViewGeometry):
                raise ValueError(f"{name} geometry {v!r} is invalid; expected a ViewGeometry")
        try:
            w = float(self.wet_scale_mm)
        except (TypeError, ValueError):
            w = float("nan")
        if not (_finite(w) and w > 0):
            raise ValueError(f"wet_scale_mm={self.wet_scale_mm!r} is invalid; expected a positive number (mm)")
        object.__setattr__(self, "wet_scale_mm", w)

    @classmethod
    def uniform(cls, sdd: float = 1500.0, sid: float = 1000.0, detector_size: int | tuple[int, int] = (256, 256),
                pixel_spacing: float | tuple[float, float] = 2.0, wet_scale_mm: float = 250.0) -> "DRRGeometry":
        """Both views with the same distances, detector and pitch, no offset or angle deviation."""
        view = ViewGeometry(sdd, sid, detector_size, pixel_spacing)
        return cls(view, view, wet_scale_mm)

    @classmethod
    def fit(cls, shape_dhw: tuple[int, int, int], spacing_dhw: tuple[float, float, float],
            detector_size: int | tuple[int, int] = 256, sdd: float = 1500.0, sid: float = 1000.0,
            wet_scale_mm: float = 250.0, margin: float = 1.05) -> "DRRGeometry":
        """A uniform geometry whose (square) pixel pitch makes the whole volume's projection fit both views.

        Args:
            shape_dhw: volume size ``(D, H, W)``.
            spacing_dhw: voxel spacing in mm along ``(D, H, W)``.
            detector_size: detector pixels (int for square).
            sdd, sid, wet_scale_mm: as in :meth:`uniform`.
            margin: extra field of view factor (>= 1).
        """
        rows, cols = _pair(detector_size, "detector_size", int)
        ed, eh, ew = (n * s / 2 for n, s in zip(shape_dhw, spacing_dhw))  # half extents (mm)
        if sid <= max(eh, ew):
            raise ValueError(f"sid={sid} mm is inside the volume (half extents {eh:.1f}, {ew:.1f} mm)")
        mag_ap, mag_lat = sdd / (sid - eh), sdd / (sid - ew)  # magnification of the nearest face
        pitch = max(2 * ed * mag_ap / rows, 2 * ew * mag_ap / cols, 2 * ed * mag_lat / rows, 2 * eh * mag_lat / cols)
        return cls.uniform(sdd, sid, (rows, cols), pitch * margin, wet_scale_mm)

    def view(self, view: str) -> ViewGeometry:
        """The :class:`ViewGeometry` of ``"AP"`` or ``"LAT"``."""
        return self.ap if _check_view(view) == "AP" else self.lat

    def replace_view(self, view: str, **changes) -> "DRRGeometry":
        """A copy with some fields of one view changed (e.g. ``replace_view("LAT", angle=2.0)``)."""
        new = replace(self.view(view), **changes)
        return replace(self, **{_check_view(view).lower(): new})

    @property
    def is_uniform(self) -> bool:
        """Both views alike, square pixels, no offset, angle or reversed source (the dataset.json flat form)."""
        a = self.ap
        return (a == self.lat and a.pixel_spacing[0] == a.pixel_spacing[1] and a.offset == (0.0, 0.0)
                and a.angle == 0.0 and not a.reversed)

    def _common(self, name: str):
        a, b = getattr(self.ap, name), getattr(self.lat, name)
        if a != b:
            raise ValueError(f"the AP and LAT views differ in {name} ({a} vs {b}); use geometry.view(...).{name}")
        return a

    @property
    def sdd(self) -> float:
        """Source-to-detector distance shared by both views (ValueError when they differ)."""
        return self._common("sdd")

    @property
    def sid(self) -> float:
        """Source-to-isocentre distance shared by both views (ValueError when they differ)."""
        return self._common("sid")

    @property
    def detector_size(self) -> tuple[int, int]:
        """Detector ``(rows, cols)`` shared by both views (ValueError when they differ)."""
        return self._common("detector_size")

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """Pixel pitch ``(row, col)`` shared by both views (ValueError when they differ)."""
        return self._common("pixel_spacing")

    def to_dict(self) -> dict:
        """Plain dict for dataset.json: flat ``sdd, sid, detector_size, pixel_spacing, wet_scale_mm`` when
        :attr:`is_uniform`, else ``{"views": {"AP": ..., "LAT": ...}, "wet_scale_mm": ...}``."""
        if self.is_uniform:
            a = self.ap
            return {"sdd": a.sdd, "sid": a.sid, "detector_size": list(a.detector_size),
                    "pixel_spacing": a.pixel_spacing[0], "wet_scale_mm": self.wet_scale_mm}
        return {"views": {"AP": self.ap.to_dict(), "LAT": self.lat.to_dict()}, "wet_scale_mm": self.wet_scale_mm}

    @classmethod
    def from_dict(cls, d: dict) -> "DRRGeometry":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict):
            raise ValueError(f"DRR geometry {d!r} is not a mapping")
        if "views" in d:
            views = d["views"]
            if not isinstance(views, dict) or set(views) != set(VIEWS):
                raise ValueError(f"DRR geometry views {views!r} must hold exactly {VIEWS}")
            return cls(ViewGeometry.from_dict(views["AP"]), ViewGeometry.from_dict(views["LAT"]),
                       d.get("wet_scale_mm", 250.0))
        keys = ("sdd", "sid", "detector_size", "pixel_spacing", "wet_scale_mm")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"DRR geometry {d!r} lacks {missing}")
        return cls.uniform(**{k: d[k] for k in keys})

    def to_tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``(2, len(VIEW_PARAMS))`` packed parameters, AP row first (what the network takes per sample)."""
        return torch.stack([self.ap.to_tensor(dtype), self.lat.to_tensor(dtype)])

    @classmethod
    def from_tensor(cls, t: torch.Tensor, wet_scale_mm: float = 250.0) -> "DRRGeometry":
        """Inverse of :meth:`to_tensor`."""
        if t.shape != (2, len(VIEW_PARAMS)):
            raise ValueError(f"packed geometry has shape {tuple(t.shape)}, expected (2, {len(VIEW_PARAMS)})")
        return cls(ViewGeometry.from_tensor(t[0]), ViewGeometry.from_tensor(t[1]), wet_scale_mm)

    def rays(self, view: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Source and detector pixel centres of ``view`` in the volume-centred mm frame ``(z, y, x)``.

        Returns:
            ``source`` ``(3,)`` and ``targets`` ``(rows * cols, 3)`` in row-major pixel order, float64.
        """
        g = self.view(view)
        rows, cols = g.detector_size
        pr, pc = g.pixel_spacing
        depth, col = _view_axes(view, torch.tensor(g.angle, dtype=torch.float64),
                                torch.tensor(float(g.reversed), dtype=torch.float64))
        z = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        r = (torch.arange(rows, dtype=torch.float64) - (rows - 1) / 2) * pr + g.offset[0]
        c = (torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2) * pc + g.offset[1]
        rr, cc = torch.meshgrid(r, c, indexing="ij")
        targets = (g.sdd - g.sid) * depth + rr[..., None] * z + cc[..., None] * col
        return -g.sid * depth, targets.reshape(-1, 3)

    def sample_grid(self, view: str, volume_shape_dhw: tuple[int, int, int],
                    spacing_dhw: tuple[float, float, float]) -> torch.Tensor:
        """Detector position of every voxel centre, for ``F.grid_sample`` on the ``view`` image.

        Args:
            view: ``"AP"`` or ``"LAT"``.
            volume_shape_dhw: volume size ``(D, H, W)``.
            spacing_dhw: voxel spacing in mm along ``(D, H, W)``.

        Returns:
            float32 ``(D, H, W, 2)``: last axis ``(x, y)`` = (column, row) of the detector normalised
            to [-1, 1] with ``align_corners=False`` (values outside mean the voxel projects off the
            detector). ``F.grid_sample(xray (B, C, h, w), grid.flatten(1, 2)[None], align_corners=False)``
            back-projects detector features onto the voxels.
        """
        points = voxel_centres(volume_shape_dhw, spacing_dhw)
        d, h, w = points.shape[:3]
        grid = project_points(points.reshape(-1, 3), view, self.view(view).to_tensor())
        return grid.reshape(d, h, w, 2).to(torch.float32)

    def to_columns(self) -> dict[str, float]:
        """Per-subject manifest columns ``ap_sdd, ap_sid, ..., lat_reversed`` (:data:`VIEW_PARAMS` per view)."""
        out = {}
        for view in VIEWS:
            for name, value in zip(VIEW_PARAMS, self.view(view).to_tensor().tolist()):
                out[f"{view.lower()}_{name}"] = value
        return out

    @classmethod
    def from_columns(cls, row, default: "DRRGeometry") -> "DRRGeometry":
        """The geometry of one manifest row: its ``<view>_<param>`` columns over ``default``'s values.

        Args:
            row: a mapping (a pandas row or dict); absent or empty columns keep the default.
            default: the dataset's geometry (``dataset.json``).

        Raises:
            ValueError: a column that is not a number, or a resulting geometry that is invalid.
        """
        sid = row.get("subject_id", None) if hasattr(row, "get") else None
        where = f"subject {sid}: " if sid is not None else ""
        t = default.to_tensor()
        given = []
        for i, view in enumerate(VIEWS):
            for j, name in enumerate(VIEW_PARAMS):
                key = f"{view.lower()}_{name}"
                value = row.get(key, None) if hasattr(row, "get") else None
                if value is None or (isinstance(value, str) and not value.strip()):
                    continue
                try:
                    t[i, j] = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{where}manifest column {key}={value!r} is not a number") from None
                if not math.isfinite(float(t[i, j])):
                    raise ValueError(f"{where}manifest column {key}={value!r} is not finite")
                given.append(key)
        try:
            return cls.from_tensor(t, default.wet_scale_mm)
        except ValueError as e:
            raise ValueError(f"{where}manifest geometry columns ({', '.join(given) or 'none'}) give an invalid "
                             f"geometry: {e}") from None


def attenuation(volume_unit: torch.Tensor, window: HUWindow) -> torch.Tensor:
    """Water-relative linear attenuation ``max(0, 1 + HU / 1000)`` of a [-1, 1] volume (same shape)."""
    return (1.0 + window.to_hu(volume_unit) / 1000.0).clamp_min(0.0)


#: DRR ray integrators: ``"siddon"`` (exact voxel intersections, nearest voxel: the data's renderer and the
#: evaluation metric's) and ``"trilinear"`` (evenly spaced trilinear samples along each ray: smoother
#: gradients, a stand-in for guidance; see ``benchmarks/RESULTS.md``).
RENDERERS = ("siddon", "trilinear")


def _box_entry_exit(src: torch.Tensor, tgt: torch.Tensor, dims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest entry and largest exit ray parameter (0 = source, 1 = detector) over all rays through the voxel box.

    ``src`` ``(1, 1, 3)`` and ``tgt`` ``(1, N, 3)`` in voxel index space (voxel centres at integers).
    """
    direction = tgt - src
    safe = torch.where(direction.abs() < 1e-9, torch.full_like(direction, 1e-9), direction)
    a0, a1 = (-0.5 - src) / safe, (dims - 0.5 - src) / safe
    entry = torch.minimum(a0, a1).amax(-1).clamp(0, 1)
    exit_ = torch.maximum(a0, a1).amin(-1).clamp(0, 1)
    hits = exit_ > entry
    if not bool(hits.any()):
        return entry.new_tensor(0.0), entry.new_tensor(1.0)
    return entry[hits].min(), exit_[hits].max()


def _render_view(mu: torch.Tensor, spacing_dhw: tuple[float, float, float], geometry: DRRGeometry, view: str,
                 renderer: torch.nn.Module, max_elements: int, trilinear_points: int = 0) -> torch.Tensor:
    """One view of one attenuation volume ``(D, H, W)`` -> ``(rows, cols)`` water-equivalent mm."""
    dims = torch.tensor(mu.shape, dtype=torch.float64)
    spacing = torch.tensor(spacing_dhw, dtype=torch.float64)
    source, target = geometry.rays(view)
    source, target = source[None, None], target[None]  # (1, 1, 3), (1, N, 3) mm
    length = (target - source).norm(dim=-1)[:, None]  # (1, 1, N) ray length, mm
    # diffdrr's renderers work in voxel index space with voxel centres at integer coordinates
    to_index = lambda p: (p / spacing + (dims - 1) / 2).to(mu)  # noqa: E731
    src, tgt, length = to_index(source), to_index(target), length.to(mu)
    kwargs: dict = {}
    if trilinear_points:
        # one sampling range for every ray, so chunking does not change the result
        lo, hi = _box_entry_exit(src.double(), tgt.double(), dims)
        kwargs = {"n_points": trilinear_points, "alphamin": lo.to(mu), "alphamax": hi.to(mu)}
    samples_per_ray = trilinear_points or int(dims.sum() + 3)
    step = max(1, max_elements // samples_per_ray)
    parts = [renderer(mu, src, tgt[:, i:i + step], length[..., i:i + step], **kwargs)
             for i in range(0, tgt.shape[1], step)]
    rows, cols = geometry.view(view).detector_size
    return rearrange(torch.cat(parts, dim=-1), "1 1 (r c) -> r c", r=rows, c=cols)


def render_drr_pair(volume_unit: torch.Tensor, spacing_dhw: tuple[float, float, float],
                    geometry: DRRGeometry | list[DRRGeometry], window: HUWindow = HUWindow(),
                    max_elements: int = 1 << 22, renderer: str = "siddon") -> tuple[torch.Tensor, torch.Tensor]:
    """Render the AP and lateral DRRs of one or a batch of volumes.

    Args:
        volume_unit: ``(1, D, H, W)`` or ``(B, 1, D, H, W)``, values in [-1, 1] (HU via ``window``).
        spacing_dhw: voxel spacing in mm along ``(D, H, W)``.
        geometry: the pair geometry, or one per volume of a batch (all with the same detector sizes).
        window: the HU window the volume was normalised with.
        max_elements: ray-sample budget per chunk (memory knob; results do not depend on it).
        renderer: one of :data:`RENDERERS`: ``"siddon"`` (default; how the data's DRRs are made) or
            ``"trilinear"`` (two trilinear samples per voxel of the longest volume edge along each ray).

    Returns:
        ``(ap, lat)``, each float32 ``(1, rows, cols)`` or ``(B, 1, rows, cols)`` in [0, 1]
        (orientation and normalisation in the module docstring), on the volume's device.
        Differentiable w.r.t. the volume.
    """
    from diffdrr.renderers import Siddon, Trilinear  # only this module touches diffdrr

    if renderer not in RENDERERS:
        raise ValueError(f"renderer={renderer!r} is invalid; expected one of {RENDERERS}")
    if volume_unit.ndim not in (4, 5) or volume_unit.shape[-4] != 1:
        raise ValueError(f"volume has shape {tuple(volume_unit.shape)}; expected (1, D, H, W) or (B, 1, D, H, W)")
    batched = volume_unit.ndim == 5
    vols = volume_unit if batched else volume_unit[None]
    geometries = list(geometry) if isinstance(geometry, (list, tuple)) else [geometry] * vols.shape[0]
    if len(geometries) != vols.shape[0]:
        raise ValueError(f"{len(geometries)} geometries for a batch of {vols.shape[0]} volumes; expected one each")
    trilinear_points = 2 * max(vols.shape[-3:]) if renderer == "trilinear" else 0
    ray_tracer = Trilinear(voxel_shift=0.5) if trilinear_points else Siddon(voxel_shift=0.5)
    mu = attenuation(vols.to(torch.float32), window)
    views = []
    for view in VIEWS:
        paths = torch.stack([_render_view(m[0], spacing_dhw, g, view, ray_tracer, max_elements, trilinear_points)
                             for m, g in zip(mu, geometries)])  # (B, rows, cols)
        wet = torch.tensor([g.wet_scale_mm for g in geometries], dtype=paths.dtype, device=paths.device)
        views.append((1.0 - torch.exp(-paths / wet[:, None, None]))[:, None])  # (B, 1, rows, cols)
    ap, lat = views
    return (ap, lat) if batched else (ap[0], lat[0])
