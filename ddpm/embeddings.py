"""Conditioning and position embeddings for BiFlowNet and the X-ray encoder.

Timestep, class-label (with a null class for classifier-free guidance) and latent-resolution
embeddings map to one conditioning vector of width ``cond_dim``; fixed sin-cos tables give token
positions in 2D (X-ray patches) and 3D (tokens inside a latent sub-volume).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) diffusion timesteps.

    Args:
        t: (B,) timesteps, any numeric dtype.
        dim: embedding width (even).
        max_period: longest wavelength.

    Returns:
        (B, dim) float32 embedding.
    """
    if dim % 2:
        raise ValueError(f"timestep embedding width must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep followed by a 2-layer MLP.

    Args:
        cond_dim: output width.
        freq_dim: width of the sinusoidal features.
    """

    def __init__(self, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, cond_dim)."""
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label table with one extra row, the null class used when the condition is dropped.

    Args:
        num_classes: number of real classes; index ``num_classes`` is the null class.
        cond_dim: output width.
    """

    def __init__(self, num_classes: int, cond_dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for a LabelEmbedder, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, cond_dim)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Embed labels.

        Args:
            labels: (B,) long in [0, num_classes).
            drop: (B,) bool; True replaces the label by the null class.

        Returns:
            (B, cond_dim).
        """
        if labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"class labels must be integers, got dtype {labels.dtype}")
        if labels.numel() and not labels.is_meta and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}), got min {int(labels.min())} max {int(labels.max())}"
            )
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)


class ResolutionEmbedder(nn.Module):
    """Embeds the latent grid size (D, H, W) so one network can serve several volume sizes.

    Args:
        cond_dim: output width.
        reference: grid size that maps to 1.0 on each axis.
    """

    def __init__(self, cond_dim: int, reference: float = 32.0) -> None:
        super().__init__()
        self.reference = reference
        self.mlp = nn.Sequential(nn.Linear(3, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, shape_dhw: tuple[int, int, int], batch: int, device: torch.device) -> torch.Tensor:
        """Grid size -> (batch, cond_dim)."""
        res = torch.tensor([s / self.reference for s in shape_dhw], device=device, dtype=self.mlp[0].weight.dtype)
        return self.mlp(res)[None].expand(batch, -1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) with dim even: [sin | cos] over geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def _sincos_nd(dim: int, sizes: tuple[int, ...]) -> torch.Tensor:
    n = len(sizes)
    per_axis = 2 * (dim // (2 * n))  # even width per axis; leftover columns stay zero
    if per_axis == 0:
        raise ValueError(f"position embedding width {dim} is too small for {n} axes")
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in sizes], indexing="ij")
    parts = [_sincos_1d(per_axis, g.reshape(-1)) for g in grids]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


def sincos_pos_embed_3d(dim: int, size_dhw: tuple[int, int, int]) -> torch.Tensor:
    """Fixed 3D sin-cos table, row-major over (d, h, w): returns (d*h*w, dim)."""
    return _sincos_nd(dim, tuple(size_dhw))


def sincos_pos_embed_2d(dim: int, size_hw: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos table, row-major over (h, w): returns (h*w, dim)."""
    return _sincos_nd(dim, tuple(size_hw))


__all__ = [
    "LabelEmbedder",
    "ResolutionEmbedder",
    "TimestepEmbedder",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_3d",
    "timestep_embedding",
]
