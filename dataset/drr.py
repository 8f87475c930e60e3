"""Cone-beam digitally reconstructed radiographs (AP + lateral) with diffdrr, and their geometry.

Geometry (all in mm, in a frame centred on the volume centre, axes along our ``(D, H, W)`` layout:
``z`` superior -> inferior, ``y`` anterior -> posterior, ``x`` patient right -> left):

- **AP**: point source at ``y = -sid`` (in front of the patient), flat detector at ``y = sdd - sid``
  (behind). Detector rows run superior -> inferior (``+z``), columns patient right -> left (``+x``),
  so the image shows like a frontal chest radiograph (patient's right on the viewer's left).
- **LAT** (left lateral): source at ``x = -sid`` (patient's right), detector at ``x = sdd - sid``
  (left). Rows superior -> inferior, columns anterior -> posterior (``+y``): the patient faces left.

The principal ray passes through the volume centre and the detector centre. Pixel ``(r, c)`` of an
``R x C`` detector with pitch ``p`` sits at ``((r - (R - 1) / 2) p, (c - (C - 1) / 2) p)`` on the plane.

Intensity: HU (from the window) become water-relative attenuation ``mu = max(0, 1 + HU / 1000)``;
diffdrr's Siddon ray tracer integrates it along each ray, giving the water-equivalent path length
``L`` in mm; the stored image is ``1 - exp(-L / wet_scale_mm)``, in [0, 1), brighter = more
attenuation (like a radiograph). The map is fixed (never per-image), so DRRs of generated volumes
are directly comparable with the inputs, and ``L = -wet_scale_mm * log(1 - x)`` recovers the path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from dataset.intensity import HUWindow

VIEWS = ("AP", "LAT")


@dataclass(frozen=True)
class DRRGeometry:
    """Cone-beam geometry shared by the AP and lateral views.

    Args:
        sdd: source-to-detector distance in mm.
        sid: source-to-isocentre (volume centre) distance in mm; must exceed the volume's half depth.
        detector_size: detector pixels ``(rows, cols)``.
        pixel_spacing: detector pixel pitch in mm (square pixels).
        wet_scale_mm: water-equivalent path (mm) that maps to ``1 - 1/e``; sets the image contrast.
    """

    sdd: float = 1500.0
    sid: float = 1000.0
    detector_size: tuple[int, int] = (256, 256)
    pixel_spacing: float = 2.0
    wet_scale_mm: float = 250.0

    def __post_init__(self) -> None:
        size = self.detector_size
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "detector_size", size)
        if len(size) != 2 or min(size) < 2:
            raise ValueError(f"detector_size={self.detector_size!r} is invalid; expected (rows, cols) >= 2")
        for name in ("sdd", "sid", "pixel_spacing", "wet_scale_mm"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; expected a positive number")
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.sdd <= self.sid:
            raise ValueError(f"sdd={self.sdd} must exceed sid={self.sid} (the detector lies beyond the isocentre)")

    @classmethod
    def fit(cls, shape_dhw: tuple[int, int, int], spacing_dhw: tuple[float, float, float],
            detector_size: int | tuple[int, int] = 256, sdd: float = 1500.0, sid: float = 1000.0,
            wet_scale_mm: float = 250.0, margin: float = 1.05) -> "DRRGeometry":
        """A geometry whose pixel pitch makes the whole volume's projection fit both views.

        Args:
            shape_dhw: volume size ``(D, H, W)``.
            spacing_dhw: voxel spacing in mm along ``(D, H, W)``.
            detector_size: detector pixels (int for square).
            sdd, sid, wet_scale_mm: as in the class.
            margin: extra field of view factor (>= 1).
        """
        rows, cols = (detector_size, detector_size) if isinstance(detector_size, int) else detector_size
        ed, eh, ew = (n * s / 2 for n, s in zip(shape_dhw, spacing_dhw))  # half extents (mm)
        if sid <= max(eh, ew):
            raise ValueError(f"sid={sid} mm is inside the volume (half extents {eh:.1f}, {ew:.1f} mm)")
        mag_ap, mag_lat = sdd / (sid - eh), sdd / (sid - ew)  # magnification of the nearest face
        pitch = max(2 * ed * mag_ap / rows, 2 * ew * mag_ap / cols, 2 * ed * mag_lat / rows, 2 * eh * mag_lat / cols)
        return cls(sdd, sid, (rows, cols), pitch * margin, wet_scale_mm)

    def to_dict(self) -> dict:
        """Plain dict for dataset.json."""
        return {"sdd": self.sdd, "sid": self.sid, "detector_size": list(self.detector_size),
                "pixel_spacing": self.pixel_spacing, "wet_scale_mm": self.wet_scale_mm}

    @classmethod
    def from_dict(cls, d: dict) -> "DRRGeometry":
        """Inverse of :meth:`to_dict`."""
        keys = ("sdd", "sid", "detector_size", "pixel_spacing", "wet_scale_mm")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"DRR geometry {d!r} lacks {missing}")
        return cls(**{k: d[k] for k in keys})

    def _check_view(self, view: str) -> str:
        if view not in VIEWS:
            raise ValueError(f"view={view!r} is invalid; expected one of {VIEWS}")
        return view

    def rays(self, view: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Source and detector pixel centres of ``view`` in the volume-centred mm frame ``(z, y, x)``.

        Returns:
            ``source`` ``(3,)`` and ``targets`` ``(rows * cols, 3)`` in row-major pixel order.
        """
        self._check_view(view)
        rows, cols = self.detector_size
        p = self.pixel_spacing
        r = (torch.arange(rows, dtype=torch.float64) - (rows - 1) / 2) * p
        c = (torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2) * p
        rr, cc = torch.meshgrid(r, c, indexing="ij")
        plane = torch.full_like(rr, self.sdd - self.sid)
        if view == "AP":
            targets = torch.stack([rr, plane, cc], dim=-1)
            source = torch.tensor([0.0, -self.sid, 0.0], dtype=torch.float64)
        else:
            targets = torch.stack([rr, cc, plane], dim=-1)
            source = torch.tensor([0.0, 0.0, -self.sid], dtype=torch.float64)
        return source, targets.reshape(-1, 3)

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
        self._check_view(view)
        rows, cols = self.detector_size
        z, y, x = _voxel_centres(volume_shape_dhw, spacing_dhw)
        depth, lateral = (y, x) if view == "AP" else (x, y)
        mag = self.sdd / (self.sid + depth)  # cone-beam magnification of each voxel
        u, v = z * mag, lateral * mag  # (row, column) position on the detector plane, mm
        grid = torch.stack([2 * v / (cols * self.pixel_spacing), 2 * u / (rows * self.pixel_spacing)], dim=-1)
        return grid.to(torch.float32)


def _voxel_centres(shape_dhw: tuple[int, int, int], spacing_dhw: tuple[float, float, float]):
    axes = [(torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * s for n, s in zip(shape_dhw, spacing_dhw)]
    return torch.meshgrid(*axes, indexing="ij")


def attenuation(volume_unit: torch.Tensor, window: HUWindow) -> torch.Tensor:
    """Water-relative linear attenuation ``max(0, 1 + HU / 1000)`` of a [-1, 1] volume (same shape)."""
    return (1.0 + window.to_hu(volume_unit) / 1000.0).clamp_min(0.0)


def _render_one(mu: torch.Tensor, spacing_dhw: tuple[float, float, float], geometry: DRRGeometry,
                renderer: torch.nn.Module, max_elements: int) -> torch.Tensor:
    """Both views of one attenuation volume ``(D, H, W)`` -> ``(2, rows, cols)`` water-equivalent mm."""
    dims = torch.tensor(mu.shape, dtype=torch.float64)
    spacing = torch.tensor(spacing_dhw, dtype=torch.float64)
    sources, targets = zip(*(geometry.rays(v) for v in VIEWS))
    source = torch.stack(sources)[:, None]  # (2, 1, 3) mm
    target = torch.stack(targets)  # (2, N, 3) mm
    length = (target - source).norm(dim=-1)[:, None]  # (2, 1, N) ray length, mm
    # diffdrr's Siddon works in voxel index space with voxel centres at integer coordinates
    to_index = lambda p: (p / spacing + (dims - 1) / 2).to(mu)  # noqa: E731
    src, tgt, length = to_index(source), to_index(target), length.to(mu)
    step = max(1, max_elements // int(dims.sum() + 3))
    parts = [renderer(mu, src, tgt[:, i:i + step], length[..., i:i + step]) for i in range(0, tgt.shape[1], step)]
    rows, cols = geometry.detector_size
    return rearrange(torch.cat(parts, dim=-1), "v 1 (r c) -> v r c", r=rows, c=cols)


def render_drr_pair(volume_unit: torch.Tensor, spacing_dhw: tuple[float, float, float],
                    geometry: DRRGeometry, window: HUWindow = HUWindow(),
                    max_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Render the AP and lateral DRRs of one or a batch of volumes.

    Args:
        volume_unit: ``(1, D, H, W)`` or ``(B, 1, D, H, W)``, values in [-1, 1] (HU via ``window``).
        spacing_dhw: voxel spacing in mm along ``(D, H, W)``.
        geometry: the detector geometry.
        window: the HU window the volume was normalised with.
        max_elements: ray-sample budget per chunk (memory knob; results do not depend on it).

    Returns:
        ``(ap, lat)``, each float32 ``(1, rows, cols)`` or ``(B, 1, rows, cols)`` in [0, 1]
        (orientation and normalisation in the module docstring), on the volume's device.
        Differentiable w.r.t. the volume.
    """
    from diffdrr.renderers import Siddon  # only this module touches diffdrr

    if volume_unit.ndim not in (4, 5) or volume_unit.shape[-4] != 1:
        raise ValueError(f"volume has shape {tuple(volume_unit.shape)}; expected (1, D, H, W) or (B, 1, D, H, W)")
    batched = volume_unit.ndim == 5
    vols = volume_unit if batched else volume_unit[None]
    renderer = Siddon(voxel_shift=0.5)
    mu = attenuation(vols.to(torch.float32), window)
    paths = torch.stack([_render_one(m[0], spacing_dhw, geometry, renderer, max_elements) for m in mu])
    images = 1.0 - torch.exp(-paths / geometry.wet_scale_mm)  # (B, 2, rows, cols)
    ap, lat = images[:, 0:1], images[:, 1:2]
    return (ap, lat) if batched else (ap[0], lat[0])
