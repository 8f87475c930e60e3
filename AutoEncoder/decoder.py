"""Convolutional 3D decoder mirroring :class:`AutoEncoder.encoder.Encoder`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from AutoEncoder.blocks import (
    SLAB_AXIS,
    UPSAMPLERS,
    AttentionBlock3d,
    ResBlock3d,
    assemble,
    conv_slab,
    group_norm,
    group_norm_stats,
    group_norm_with,
)


UPSAMPLE_CHANNELS = ("same", "next")


class Decoder(nn.Module):
    """Maps a latent volume back to image space, ``2 ** (len(channels) - 1)`` times larger per axis.

    Args:
        out_channels: image channels (1 for CT).
        channels: feature channels per level, listed from the finest level (as in the encoder).
        latent_channels: channels of the input latent.
        num_res_blocks: residual blocks per level.
        attention_heads: heads of the bottleneck self-attention; 0 disables it.
        num_groups: upper bound on GroupNorm groups.
        upsample: ``"nearest"`` (nearest-neighbour doubling + 3x3x3 convolution, :class:`Upsample3d`) or
            ``"transposed"`` (4x4x4 stride-2 transposed convolution, :class:`TransposedUpsample3d`).
        upsample_channels: ``"same"``: each up-sampling keeps its level's channels and the next level's first
            residual block changes them; ``"next"``: the up-sampling already outputs the next (finer) level's
            channels, so that no full-resolution convolution runs at the coarser level's width.
    """

    def __init__(
        self,
        out_channels: int,
        channels: Sequence[int],
        latent_channels: int,
        num_res_blocks: int = 1,
        attention_heads: int = 1,
        num_groups: int = 32,
        upsample: str = "nearest",
        upsample_channels: str = "same",
    ):
        super().__init__()
        if upsample not in UPSAMPLERS:
            raise ValueError(f"upsample={upsample!r}; expected one of {sorted(UPSAMPLERS)}")
        if upsample_channels not in UPSAMPLE_CHANNELS:
            raise ValueError(f"upsample_channels={upsample_channels!r}; expected one of {UPSAMPLE_CHANNELS}")
        rev = list(channels)[::-1]
        prev = rev[0]
        self.conv_in = nn.Conv3d(latent_channels, prev, 3, padding=1)
        mid: list[nn.Module] = [ResBlock3d(prev, prev, num_groups)]
        if attention_heads > 0:
            mid.append(AttentionBlock3d(prev, attention_heads, num_groups))
        mid.append(ResBlock3d(prev, prev, num_groups))
        self.mid = nn.Sequential(*mid)
        levels: list[nn.Module] = []
        for i, ch in enumerate(rev):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock3d(prev, ch, num_groups))
                prev = ch
            if i < len(rev) - 1:
                out = rev[i + 1] if upsample_channels == "next" else prev
                blocks.append(UPSAMPLERS[upsample](prev, out))
                prev = out
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(prev, num_groups)
        self.conv_out = nn.Conv3d(prev, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output convolution (used by the adaptive adversarial weight)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, latent_channels, d, h, w)`` -> volume ``(B, C_out, d*f, h*f, w*f)`` (about [-1, 1])."""
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward_slabs(self, z: torch.Tensor, planes: int) -> torch.Tensor:
        """:meth:`forward`, computed layer by layer over the whole volume in slabs (along ``W``).

        The latent-resolution part (input convolution, bottleneck blocks and their global attention) runs whole;
        every later block runs slab by slab with GroupNorm statistics of the whole volume
        (:meth:`ResBlock3d.forward_slabs`), so the output matches :meth:`forward` up to floating-point rounding
        (no seams) while temporaries stay slab-sized: without autograd, memory is about two full-resolution feature
        volumes of one block instead of every intermediate of a layer. Differentiable (gradients are exact as
        well, but autograd keeps the slab intermediates, so it saves no memory when training).

        Args:
            z: latent ``(B, latent_channels, d, h, w)``.
            planes: slab thickness in latent voxels (>= 1); a level ``s`` times finer than the latent uses slabs of
                ``planes * s`` voxels, so every level is cut into the same number of slabs.

        Returns:
            ``(B, C_out, d*f, h*f, w*f)``.
        """
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            for block in level:
                h = block.forward_slabs(h, planes * (h.shape[SLAB_AXIS] // z.shape[SLAB_AXIS]))
        planes = planes * (h.shape[SLAB_AXIS] // z.shape[SLAB_AXIS])
        mean, rstd = group_norm_stats(self.norm_out, h, planes)
        prepare = lambda t: F.silu(group_norm_with(self.norm_out, t, mean, rstd))  # noqa: E731
        return assemble(h, self.conv_out.out_channels, 1, planes, lambda d0, d1: conv_slab(self.conv_out, h, d0, d1, prepare))
