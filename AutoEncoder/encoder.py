"""Convolutional 3D encoder: residual levels with stride-2 downsampling and an attention bottleneck."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from AutoEncoder.blocks import AttentionBlock3d, Downsample3d, ResBlock3d, group_norm


class Encoder(nn.Module):
    """Maps a volume patch to a latent volume ``2 ** (len(channels) - 1)`` times smaller per axis.

    Args:
        in_channels: image channels (1 for CT).
        channels: feature channels per level; each level but the last ends with a stride-2 downsampling.
        latent_channels: channels of the output latent (the codebook dimension in VQ mode).
        num_res_blocks: residual blocks per level.
        attention_heads: heads of the bottleneck self-attention; 0 disables it.
        num_groups: upper bound on GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        latent_channels: int,
        num_res_blocks: int = 1,
        attention_heads: int = 1,
        num_groups: int = 32,
    ):
        super().__init__()
        if len(channels) < 1:
            raise ValueError(f"channels must list at least one level, got {list(channels)}")
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        levels: list[nn.Module] = []
        prev = channels[0]
        for i, ch in enumerate(channels):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3d(prev, ch, num_groups))
                prev = ch
            if i < len(channels) - 1:
                blocks.append(Downsample3d(prev))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        mid: list[nn.Module] = [ResBlock3d(prev, prev, num_groups)]
        if attention_heads > 0:
            mid.append(AttentionBlock3d(prev, attention_heads, num_groups))
        mid.append(ResBlock3d(prev, prev, num_groups))
        self.mid = nn.Sequential(*mid)
        self.norm_out = group_norm(prev, num_groups)
        self.conv_out = nn.Conv3d(prev, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, D, H, W)`` in [-1, 1] -> latent ``(B, latent_channels, D/f, H/f, W/f)``."""
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))
