"""X-ray conditioning of BiFlowNet: encoder, pooled projection, projection grids, footprints, back-projection.

Geometry. The conditioner keeps the projection grids of its default (training) geometry as buffers,
together with that geometry and the latent voxel spacing, so a checkpoint rebuilds its projection
alone. A batch may carry each sample's own geometry (``(B, 2, 10)`` packed by
``dataset.drr.DRRGeometry.to_tensor``): samples whose geometry is the default use the buffers, the
others get grids and footprint masks computed with :func:`dataset.drr.project_points` and cached per
distinct geometry on the device (least recently used first out, :data:`GEOMETRY_CACHE_SIZE` entries).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from dataset.drr import MAX_ANGLE, VIEW_PARAMS, VIEWS, DRRGeometry, ViewGeometry
from ddpm.projection import back_project, footprint_mask, parallel_projection_grids, projection_grids
from ddpm.xray_encoder import XrayEncoder

CROSS_ATTENTION_MODES = ("none", "full", "footprint")
#: Distinct per-sample geometries whose grids and footprints are kept on the device.
GEOMETRY_CACHE_SIZE = 128


def _to_bits(values: torch.Tensor) -> torch.Tensor:
    """float64 values -> their int64 bit patterns (kept exactly through dtype casts of the module)."""
    return values.to(torch.float64).contiguous().view(torch.int64).clone()


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_bits` (a float64 CPU tensor)."""
    return bits.detach().cpu().contiguous().view(torch.float64).clone()


@dataclass
class XrayConditioning:
    """What the X-ray pair contributes to one BiFlowNet forward pass.

    Attributes:
        pooled: (B, cond_dim) vector added to the timestep/class conditioning.
        tokens: (B, M, C) X-ray tokens for cross-attention, or None without cross-attention.
        mask: bool footprint mask (True = may attend), (n*T, M) shared by the batch or (B, n*T, M) per
            sample; None for unrestricted attention.
        features: (B, backproj_channels, D, H, W) back-projected features, or None.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    features: torch.Tensor | None = None


@dataclass
class _Projection:
    """Grids ((D, H, W, 2) each) and footprint ((n_sub, M) bool, or None) of one geometry on one device."""

    grid_ap: torch.Tensor
    grid_lat: torch.Tensor
    footprint: torch.Tensor | None


class XrayConditioner(nn.Module):
    """Turns an AP + lateral pair into pooled conditioning, cross-attention tokens and ray features.

    The projection grids map every latent voxel to its detector position in both views; they define the
    footprint of each latent sub-volume (which X-ray tokens its DiT tokens may attend to) and the rays
    along which X-ray features are back-projected.

    Args:
        xray: :class:`XrayEncoder` keyword arguments.
        cond_dim: width of the conditioning vector.
        latent_shape: (D, H, W) of the latent grid.
        sub_volume: edge of a latent sub-volume in latent voxels.
        tokens_per_sub_volume: DiT tokens per sub-volume (each gets its sub-volume's footprint).
        cross_attention: ``"none"``, ``"full"`` or ``"footprint"``.
        back_projection: produce back-projected features.
        backproj_channels: channels of the back-projected features.
    """

    def __init__(
        self,
        xray: dict,
        cond_dim: int,
        latent_shape: Sequence[int],
        sub_volume: int,
        tokens_per_sub_volume: int,
        cross_attention: str = "none",
        back_projection: bool = False,
        backproj_channels: int = 8,
    ) -> None:
        super().__init__()
        if cross_attention not in CROSS_ATTENTION_MODES:
            raise ValueError(f"cross_attention={cross_attention!r}, expected one of {CROSS_ATTENTION_MODES}")
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.sub_volume = sub_volume
        self.tokens_per_sub_volume = tokens_per_sub_volume
        self.cross_attention = cross_attention
        self.encoder = XrayEncoder(**xray)
        dim = self.encoder.dim
        self.pooled_proj = nn.Sequential(nn.Linear(dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        grid_ap, grid_lat = parallel_projection_grids(self.latent_shape)
        self.register_buffer("grid_ap", grid_ap)  # (D, H, W, 2) detector coordinates, saved with the weights
        self.register_buffer("grid_lat", grid_lat)
        # default geometry (2, 10), latent voxel spacing (3,) mm and DRR wet scale (1,) as float64 bit patterns:
        # module.to(dtype) and FSDP mixed precision would round float buffers (1500 mm -> 1504 mm in bf16);
        # all zeros = unknown (parallel-beam grids)
        self.register_buffer("geometry_bits", torch.zeros(2, len(VIEW_PARAMS), dtype=torch.int64))
        self.register_buffer("spacing_bits", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("wet_scale_bits", torch.zeros(1, dtype=torch.int64))
        self.bp_proj = nn.Conv3d(2 * dim, backproj_channels, 1) if back_projection else None
        self._cache: OrderedDict[tuple, _Projection] = OrderedDict()  # per-sample geometries, LRU
        self._fixed_source: tuple | None = None  # grid buffers the default footprint was computed from

    @property
    def context_dim(self) -> int | None:
        """Token width the DiT blocks cross-attend to (None without cross-attention)."""
        return self.encoder.dim if self.cross_attention != "none" else None

    @property
    def uses_projection(self) -> bool:
        """Whether grids matter (footprint cross-attention or back-projection)."""
        return self.cross_attention == "footprint" or self.bp_proj is not None

    # ------------------------------------------------------------------------------------------ geometry
    @property
    def latent_spacing(self) -> tuple[float, float, float] | None:
        """Latent voxel spacing (D, H, W) in mm, or None when unknown."""
        s = _from_bits(self.spacing_bits)
        return tuple(float(v) for v in s) if bool((s > 0).all()) else None

    @property
    def geometry(self) -> DRRGeometry | None:
        """The default (training) geometry, or None when the grids are parallel-beam or set by hand."""
        g = _from_bits(self.geometry_bits)
        if not bool(g.any()):
            return None
        return DRRGeometry.from_tensor(g, float(_from_bits(self.wet_scale_bits)[0]))

    def set_geometry(self, geometry: DRRGeometry | None, latent_spacing: Sequence[float] | None) -> None:
        """Make ``geometry`` the default and rebuild the grid buffers from it.

        Args:
            geometry: the training DRR geometry (its detector size must be the encoder's image size), or
                None for parallel-beam grids.
            latent_spacing: latent voxel spacing (D, H, W) in mm (CT spacing times the CT-to-latent
                factor); needed for cone-beam grids and for per-sample geometries.
        """
        spacing = None
        if latent_spacing is not None:
            spacing = tuple(float(s) for s in latent_spacing)
            if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise ValueError(f"latent_spacing={latent_spacing!r} is invalid; expected three positive mm values")
        if geometry is not None:
            if spacing is None:
                raise ValueError("a cone-beam geometry needs the latent voxel spacing (latent_spacing)")
            for view in VIEWS:
                self._check_detector(geometry.view(view), f"default geometry ({view})")
            grids = projection_grids(geometry.to_tensor(), self.latent_shape, spacing)
        else:
            grids = parallel_projection_grids(self.latent_shape)
        device = self.grid_ap.device
        self.grid_ap.copy_(grids[0].to(device))
        self.grid_lat.copy_(grids[1].to(device))
        packed = geometry.to_tensor() if geometry is not None else torch.zeros(2, len(VIEW_PARAMS), dtype=torch.float64)
        self.geometry_bits.copy_(_to_bits(packed).to(device))
        self.spacing_bits.copy_(_to_bits(torch.tensor(spacing or (0.0, 0.0, 0.0))).to(device))
        self.wet_scale_bits.copy_(_to_bits(torch.tensor([geometry.wet_scale_mm if geometry else 0.0])).to(device))
        self._cache.clear()
        self._fixed_source = None

    def set_projection_grids(self, grid_ap: torch.Tensor, grid_lat: torch.Tensor) -> None:
        """Replace the (D, H, W, 2) projection grids by hand (the default geometry becomes unknown)."""
        expected = (*self.latent_shape, 2)
        for name, g in (("AP", grid_ap), ("LAT", grid_lat)):
            if tuple(g.shape) != expected:
                raise ValueError(f"{name} projection grid has shape {tuple(g.shape)}, expected {expected}")
        self.grid_ap.copy_(grid_ap)
        self.grid_lat.copy_(grid_lat)
        self.geometry_bits.zero_()
        self.wet_scale_bits.zero_()
        self._cache.clear()
        self._fixed_source = None

    def projection_state(self) -> dict[str, torch.Tensor]:
        """The buffers that describe the projection (grids, default geometry, spacing), on the CPU."""
        names = ("grid_ap", "grid_lat", "geometry_bits", "spacing_bits", "wet_scale_bits")
        return {n: getattr(self, n).detach().cpu().contiguous() for n in names}

    def load_projection_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`projection_state` (grids alone are accepted too)."""
        self.set_projection_grids(state["grid_ap"].to(self.grid_ap.device), state["grid_lat"].to(self.grid_lat.device))
        for name in ("geometry_bits", "spacing_bits", "wet_scale_bits"):
            if name in state:
                getattr(self, name).copy_(state[name].to(self.grid_ap.device))

    def _check_detector(self, view: ViewGeometry, what: str) -> None:
        if tuple(view.detector_size) != tuple(self.encoder.image_size):
            raise ValueError(f"{what} has a {view.detector_size} detector, but this network takes "
                             f"{tuple(self.encoder.image_size)} X-rays; map the images onto the model's detector first")

    def _check_packed(self, geometry: torch.Tensor, batch: int) -> torch.Tensor:
        """Shape and finiteness of a packed batch geometry; returns it as a float64 CPU tensor."""
        expected = (batch, 2, len(VIEW_PARAMS))
        if not isinstance(geometry, torch.Tensor) or tuple(geometry.shape) != expected:
            shape = tuple(geometry.shape) if isinstance(geometry, torch.Tensor) else type(geometry).__name__
            raise ValueError(f"geometry has shape {shape}, expected {expected} (DRRGeometry.to_tensor() per sample)")
        g = geometry.detach().to("cpu", torch.float64)
        bad = ~torch.isfinite(g)
        if bool(bad.any()):
            i, v, k = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(f"geometry of sample {i} ({VIEWS[v]}) has a non-finite {VIEW_PARAMS[k]}")
        return g

    def _check_sample(self, i: int, pair: torch.Tensor) -> None:
        """One sample's packed (2, 10) geometry must be a valid geometry on the encoder's detector."""
        for v, view in enumerate(VIEWS):
            row = pair[v]
            if any(float(row[k]) != round(float(row[k])) for k in (2, 3)) or float(row[9]) not in (0.0, 1.0):
                raise ValueError(f"geometry of sample {i} ({view}): rows/cols must be integers and reversed 0 or 1, "
                                 f"got {dict(zip(VIEW_PARAMS, row.tolist()))}")
            try:
                self._check_detector(ViewGeometry.from_tensor(row), f"geometry of sample {i} ({view})")
            except ValueError as e:
                raise ValueError(f"geometry of sample {i} ({view}): {e}") from None

    def check_geometry(self, geometry: torch.Tensor, batch: int) -> torch.Tensor:
        """Validate a packed ``(B, 2, 10)`` batch geometry; returns it as a float64 CPU tensor.

        Raises:
            ValueError: wrong shape, non-finite values, or a geometry that is invalid (``sdd <= sid``,
                pitch <= 0, ``|angle| > 45`` degrees) or whose detector is not the encoder's image size;
                the message names the sample and view.
        """
        g = self._check_packed(geometry, batch)
        for i in range(batch):
            self._check_sample(i, g[i])
        return g

    def _footprint(self, grid_ap: torch.Tensor, grid_lat: torch.Tensor) -> torch.Tensor | None:
        """(n_sub, M) footprint of one geometry (None without footprint cross-attention)."""
        if self.cross_attention != "footprint":
            return None
        with torch.no_grad():
            return footprint_mask(grid_ap, grid_lat, self.sub_volume, self.encoder.grid_hw, 1)

    def _fixed(self) -> _Projection:
        """The grid buffers and their footprint, recomputed only when the buffers' values change."""
        ref = self._fixed_source
        same = (ref is not None and ref[0].device == self.grid_ap.device
                and torch.equal(ref[0], self.grid_ap) and torch.equal(ref[1], self.grid_lat))
        if not same:
            self._fixed_source = (self.grid_ap.detach().clone(), self.grid_lat.detach().clone(),
                                  self._footprint(self.grid_ap, self.grid_lat))
        return _Projection(self.grid_ap, self.grid_lat, self._fixed_source[2])

    def _per_sample(self, i: int, pair: torch.Tensor, spacing: tuple[float, float, float]) -> _Projection:
        """Projection of one sample's (2, 10) geometry, from the cache or computed (and validated) once."""
        device = self.grid_ap.device
        key = (str(device), spacing, pair.numpy().tobytes())
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        self._check_sample(i, pair)
        with torch.no_grad():
            grid_ap, grid_lat = projection_grids(pair.to(device), self.latent_shape, spacing)
        entry = _Projection(grid_ap, grid_lat, self._footprint(grid_ap, grid_lat))
        self._cache[key] = entry
        while len(self._cache) > GEOMETRY_CACHE_SIZE:
            self._cache.popitem(last=False)
        return entry

    def projection(self, geometry: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Grids and footprint mask for a batch.

        Args:
            geometry: ``(B, 2, 10)`` packed per-sample geometries, or None (the default geometry).
            batch: B.

        Returns:
            ``(grid_ap, grid_lat, mask)``: grids ``(D, H, W, 2)`` shared by the batch when every sample has
            the default geometry, else ``(B, D, H, W, 2)``; mask ``(n*T, M)`` or ``(B, n*T, M)`` bool
            (None without footprint cross-attention).
        """
        fixed = self._fixed()
        is_default = [True] * batch
        if geometry is not None:
            g = self._check_packed(geometry, batch)
            default = _from_bits(self.geometry_bits)
            # compared in the caller's precision: a float32 copy of the default geometry is the default
            default = default.to(geometry.dtype).to(torch.float64) if bool(default.any()) else None
            is_default = [default is not None and torch.equal(pair, default) for pair in g]
        t = self.tokens_per_sub_volume
        if all(is_default):
            mask = None if fixed.footprint is None else repeat(fixed.footprint, "n m -> (n t) m", t=t)
            return fixed.grid_ap, fixed.grid_lat, mask
        spacing = self.latent_spacing
        if spacing is None:
            raise ValueError("this BiFlowNet does not know its latent voxel spacing (trained without a dataset.json "
                             "geometry), so it cannot take per-sample geometries; pass geometry=None")
        entries = [fixed if same else self._per_sample(i, g[i], spacing) for i, same in enumerate(is_default)]
        grid_ap = torch.stack([e.grid_ap for e in entries])
        grid_lat = torch.stack([e.grid_lat for e in entries])
        mask = None
        if fixed.footprint is not None:
            mask = repeat(torch.stack([e.footprint for e in entries]), "b n m -> b (n t) m", t=t)
        return grid_ap, grid_lat, mask

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        ap: torch.Tensor | None,
        lat: torch.Tensor | None,
        drop: torch.Tensor | None = None,
        geometry: torch.Tensor | None = None,
    ) -> XrayConditioning:
        """Encode an X-ray pair.

        Args:
            ap, lat: (B, 1, H, W) X-rays in [0, 1] (display conventions of :class:`XrayEncoder`).
            drop: optional (B,) bool; True replaces that sample's X-ray output by the learned null condition.
            geometry: optional (B, 2, 10) packed geometry of each pair (``DRRGeometry.to_tensor()``); None
                means the default geometry.

        Returns:
            :class:`XrayConditioning`.
        """
        if ap is None or lat is None:
            raise ValueError("this BiFlowNet is X-ray conditioned; pass ap and lat")
        tokens, pooled = self.encoder(ap, lat, drop)  # (B, M, Cx), (B, Cx)
        out = XrayConditioning(pooled=self.pooled_proj(pooled))
        if self.cross_attention != "none":
            out.tokens = tokens
        if geometry is not None and not self.uses_projection:
            self.check_geometry(geometry, ap.shape[0])  # refused even when the grids are not needed
        if self.uses_projection:
            grid_ap, grid_lat, out.mask = self.projection(geometry, ap.shape[0])
            if self.bp_proj is not None:
                out.features = self._back_projected(tokens, grid_ap, grid_lat)
        return out

    def _back_projected(self, tokens: torch.Tensor, grid_ap: torch.Tensor, grid_lat: torch.Tensor) -> torch.Tensor:
        """``bp_proj`` (a 1x1x1 convolution) of both views' token maps spread along their rays.

        Bilinear sampling is linear and acts on each channel alone, so the projection runs on the detector
        maps first and only ``backproj_channels`` maps are spread into the volume: the same result without
        the ``(B, 2 * dim, D, H, W)`` volume of features (at 16^3 latents and dim 256, 2 M values per sample
        whose projection, layout copies and backward cost ~40 ms of a 0.9 s CPU bf16 training step).
        A ``bp_proj`` wrapped by an adapter (LoRA) keeps the original order.
        """
        if not isinstance(self.bp_proj, nn.Conv3d):
            ap_map, lat_map = self.encoder.token_maps(tokens)
            return self.bp_proj(torch.cat([back_project(ap_map, grid_ap), back_project(lat_map, grid_lat)], dim=1))
        weight = self.bp_proj.weight.flatten(1)  # (backproj_channels, 2 * dim): AP columns, then LAT
        ap_tok, lat_tok = tokens.chunk(2, dim=1)
        dim = self.encoder.dim
        projected = torch.cat([F.linear(ap_tok, weight[:, :dim]), F.linear(lat_tok, weight[:, dim:])], dim=1)
        ap_map, lat_map = self.encoder.token_maps(projected)
        out = back_project(ap_map, grid_ap) + back_project(lat_map, grid_lat)
        return out if self.bp_proj.bias is None else out + self.bp_proj.bias.to(out.dtype).view(1, -1, 1, 1, 1)


__all__ = ["CROSS_ATTENTION_MODES", "GEOMETRY_CACHE_SIZE", "XrayConditioner", "XrayConditioning"]
