"""X-ray conditioning of BiFlowNet: encoder, pooled projection, projection grids, footprints, back-projection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ddpm.projection import back_project, footprint_mask, parallel_projection_grids
from ddpm.xray_encoder import XrayEncoder

CROSS_ATTENTION_MODES = ("none", "full", "footprint")


@dataclass
class XrayConditioning:
    """What the X-ray pair contributes to one BiFlowNet forward pass.

    Attributes:
        pooled: (B, cond_dim) vector added to the timestep/class conditioning.
        tokens: (B, M, C) X-ray tokens for cross-attention, or None without cross-attention.
        mask: (n*T, M) bool footprint mask (True = may attend), or None for unrestricted attention.
        features: (B, backproj_channels, D, H, W) back-projected features, or None.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    features: torch.Tensor | None = None


class XrayConditioner(nn.Module):
    """Turns an AP + lateral pair into pooled conditioning, cross-attention tokens and ray features.

    The projection grids map every latent voxel to its detector position in both views (buffers saved
    with the weights); they define the footprint of each latent sub-volume (which X-ray tokens its DiT
    tokens may attend to) and the rays along which X-ray features are back-projected.

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
        self.bp_proj = nn.Conv3d(2 * dim, backproj_channels, 1) if back_projection else None

    @property
    def context_dim(self) -> int | None:
        """Token width the DiT blocks cross-attend to (None without cross-attention)."""
        return self.encoder.dim if self.cross_attention != "none" else None

    def set_projection_grids(self, grid_ap: torch.Tensor, grid_lat: torch.Tensor) -> None:
        """Replace the (D, H, W, 2) projection grids, e.g. with the dataset's cone-beam geometry."""
        expected = (*self.latent_shape, 2)
        for name, g in (("AP", grid_ap), ("LAT", grid_lat)):
            if tuple(g.shape) != expected:
                raise ValueError(f"{name} projection grid has shape {tuple(g.shape)}, expected {expected}")
        self.grid_ap.copy_(grid_ap)
        self.grid_lat.copy_(grid_lat)

    def footprint(self) -> torch.Tensor:
        """(n_sub * T, M) bool mask of the X-ray tokens each DiT token may attend to."""
        return footprint_mask(
            self.grid_ap, self.grid_lat, self.sub_volume, self.encoder.grid_hw, self.tokens_per_sub_volume
        )

    def forward(
        self, ap: torch.Tensor | None, lat: torch.Tensor | None, drop: torch.Tensor | None = None
    ) -> XrayConditioning:
        """Encode an X-ray pair.

        Args:
            ap, lat: (B, 1, H, W) X-rays in [0, 1] (display conventions of :class:`XrayEncoder`).
            drop: optional (B,) bool; True replaces that sample's X-ray output by the learned null condition.

        Returns:
            :class:`XrayConditioning`.
        """
        if ap is None or lat is None:
            raise ValueError("this BiFlowNet is X-ray conditioned; pass ap and lat")
        tokens, pooled = self.encoder(ap, lat, drop)  # (B, M, Cx), (B, Cx)
        out = XrayConditioning(pooled=self.pooled_proj(pooled))
        if self.cross_attention != "none":
            out.tokens = tokens
        if self.cross_attention == "footprint":
            with torch.no_grad():
                out.mask = self.footprint()
        if self.bp_proj is not None:
            ap_map, lat_map = self.encoder.token_maps(tokens)
            feats = torch.cat([back_project(ap_map, self.grid_ap), back_project(lat_map, self.grid_lat)], dim=1)
            out.features = self.bp_proj(feats)
        return out


__all__ = ["CROSS_ATTENTION_MODES", "XrayConditioner", "XrayConditioning"]
