"""3D building blocks of the patch-volume autoencoder: residual blocks, resampling, bottleneck attention.

All blocks take and return volumes laid out as ``(B, C, D, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``num_groups`` that divides ``channels``."""
    groups = min(num_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, Conv3d) x 2 plus a 1x1x1 skip when channels change.

    Args:
        in_channels: input channels.
        out_channels: output channels (defaults to ``in_channels``).
        num_groups: upper bound on GroupNorm groups.
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, num_groups: int = 32, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample3d(nn.Module):
    """Halve every spatial size with a stride-2 3x3x3 convolution (asymmetric padding, even sizes stay exact)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C, D/2, H/2, W/2)``."""
        return self.conv(F.pad(x, (0, 1, 0, 1, 0, 1)))


class Upsample3d(nn.Module):
    """Double every spatial size: nearest-neighbour upsampling followed by a 3x3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C, 2D, 2H, 2W)``."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionBlock3d(nn.Module):
    """Multi-head self-attention over all voxels of a (bottleneck) volume, with a residual connection.

    Uses ``F.scaled_dot_product_attention`` so flash / memory-efficient kernels are picked when available.

    Args:
        channels: feature channels (must be divisible by ``num_heads``).
        num_heads: attention heads.
        num_groups: upper bound on GroupNorm groups.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels={channels} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C, D, H, W)``."""
        _, _, d, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(qkv, "b (three heads c) d h w -> three b heads (d h w) c", three=3, heads=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b heads (d h w) c -> b (heads c) d h w", d=d, h=h, w=w)
        return x + self.proj(out)
