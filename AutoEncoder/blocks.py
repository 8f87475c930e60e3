"""3D building blocks of the patch-volume autoencoder: residual blocks, resampling, bottleneck attention.

All blocks take and return volumes laid out as ``(B, C, D, H, W)``. The decoder's blocks can also run over a
large volume slab by slab (``forward_slabs``): GroupNorm statistics are reduced over the whole volume
first, then every convolution sees the exact neighbouring planes, so the result equals ``forward`` up to rounding
while only slab-sized temporaries are ever allocated.
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


# Slabs run along the last axis (W). CPU convolutions take PyTorch's fast oneDNN path only when
# batch * channels * D * H of the input is large enough (a heuristic in ATen), which thin D-slabs would miss;
# slicing W leaves that product whole.
SLAB_AXIS = 4


def slab_ranges(n: int, planes: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in pieces of at most ``planes``."""
    if planes < 1:
        raise ValueError(f"slab planes must be >= 1, got {planes}")
    return [(a, min(a + planes, n)) for a in range(0, n, planes)]


def _slab(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x.narrow(SLAB_AXIS, a, b - a)


def group_norm_stats(norm: nn.GroupNorm, x: torch.Tensor, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and ``1 / sqrt(var + eps)`` of ``x`` ``(B, C, D, H, W)``, as ``norm`` computes them.

    Reduced slab by slab (``planes`` W-planes at a time; per-slab moments merged in float64, Chan et al.), so
    no temporary larger than one slab is made.

    Returns:
        ``(mean, rstd)``, each float32 ``(B, groups)``.
    """
    groups = norm.num_groups
    count = 0
    mean = x.new_zeros((x.shape[0], groups), dtype=torch.float64)
    m2 = torch.zeros_like(mean)
    for a, b in slab_ranges(x.shape[SLAB_AXIS], planes):
        piece = rearrange(_slab(x, a, b).float(), "b (g c) d h w -> b g (c d h w)", g=groups)
        var, mu = torch.var_mean(piece, dim=-1, correction=0)
        n = piece.shape[-1]
        delta = mu.double() - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + var.double() * n + delta.pow(2) * (count * n / total)
        count = total
    return mean.float(), torch.rsqrt(m2 / count + norm.eps).float()


def group_norm_with(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """``norm`` applied to (a slab of) ``x`` ``(B, C, D, H, w)`` with given ``(B, groups)`` statistics."""
    per_group = x.shape[1] // norm.num_groups
    scale = rstd.repeat_interleave(per_group, dim=1) * norm.weight.float()  # (B, C)
    shift = norm.bias.float() - mean.repeat_interleave(per_group, dim=1) * scale
    out = x.float() * scale[:, :, None, None, None] + shift[:, :, None, None, None]
    return out if torch.is_autocast_enabled() else out.to(x.dtype)  # autocast runs GroupNorm in float32


def conv_slab(conv: nn.Conv3d, source: torch.Tensor, a: int, b: int, prepare=None,
              before: torch.Tensor | None = None) -> torch.Tensor:
    """Output planes ``a:b`` (along W) of a stride-1, 'same'-padded ``conv`` applied to ``prepare(source)`` whole.

    Reads only planes ``a - p : b + p`` of ``source`` (``p`` = kernel // 2), zero-pads where the volume ends and
    convolves without padding along W: exactly what the whole-volume convolution gives on those planes.

    Args:
        conv: a stride-1 convolution with odd kernel and padding ``kernel // 2``.
        source: ``(B, C, D, H, W)`` input volume.
        a, b: output planes wanted.
        prepare: elementwise map applied to the input planes first (normalisation and activation); None: identity.
        before: the original values of the input planes ``a - p : a`` when ``source`` is being overwritten in
            place; None reads them from ``source``.
    """
    p = conv.padding[SLAB_AXIS - 2]
    n = source.shape[SLAB_AXIS]
    lo, hi = max(0, a - p), min(n, b + p)
    piece = _slab(source, a if before is not None else lo, hi)
    if before is not None and lo < a:
        piece = torch.cat([before, piece], dim=SLAB_AXIS)
    piece = piece if prepare is None else prepare(piece)
    if p - (a - lo) or p - (hi - b):
        piece = F.pad(piece, (p - (a - lo), p - (hi - b)))
    padding = list(conv.padding)
    padding[SLAB_AXIS - 2] = 0
    return F.conv3d(piece, conv.weight, conv.bias, padding=tuple(padding))


def assemble(x: torch.Tensor, channels: int, scale: int, planes: int, piece) -> torch.Tensor:
    """A volume ``(B, channels, D*scale, H*scale, W*scale)`` built from ``piece(a, b)``, its planes
    ``scale*a : scale*b`` along W for each slab ``a:b`` of ``x``.

    Without autograd the pieces are written into one preallocated NDHWC volume (no concatenation copy); with
    autograd they are concatenated.
    """
    ranges = slab_ranges(x.shape[SLAB_AXIS], planes)
    if torch.is_grad_enabled():
        return torch.cat([piece(a, b) for a, b in ranges], dim=SLAB_AXIS)
    bsz, _, d, h, w = x.shape
    out: torch.Tensor | None = None
    for a, b in ranges:
        y = piece(a, b)
        if out is None:  # dtype of the result (autocast may change it)
            out = torch.empty((bsz, channels, d * scale, h * scale, w * scale), dtype=y.dtype, device=y.device,
                              memory_format=torch.channels_last_3d)
        _slab(out, scale * a, scale * b).copy_(y)
    assert out is not None
    return out


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

    def forward_slabs(self, x: torch.Tensor, planes: int) -> torch.Tensor:
        """:meth:`forward` computed ``planes`` planes at a time (along W) with whole-volume GroupNorm statistics.

        Without autograd it holds ``x`` and one output-sized volume (the second convolution overwrites the first
        one's result in place); everything else is slab-sized. With autograd the slabs are concatenated instead
        (no in-place writes), so gradients are exact too.
        """
        n = x.shape[SLAB_AXIS]
        mean, rstd = group_norm_stats(self.norm1, x, planes)
        prepare = lambda t: F.silu(group_norm_with(self.norm1, t, mean, rstd))  # noqa: E731
        h = assemble(x, self.conv1.out_channels, 1, planes, lambda a, b: conv_slab(self.conv1, x, a, b, prepare))
        mean, rstd = group_norm_stats(self.norm2, h, planes)
        prepare = lambda t: self.dropout(F.silu(group_norm_with(self.norm2, t, mean, rstd)))  # noqa: E731
        if torch.is_grad_enabled():
            return torch.cat([self.skip(_slab(x, a, b)) + conv_slab(self.conv2, h, a, b, prepare)
                              for a, b in slab_ranges(n, planes)], dim=SLAB_AXIS)
        before: torch.Tensor | None = None
        p = self.conv2.padding[SLAB_AXIS - 2]
        for a, b in slab_ranges(n, planes):
            out = conv_slab(self.conv2, h, a, b, prepare, before) + self.skip(_slab(x, a, b))
            before = _slab(h, max(0, b - p), b).clone()  # the next slab's lower context, before it is overwritten
            _slab(h, a, b).copy_(out)
        return h


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

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv3d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C_out, 2D, 2H, 2W)``."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def forward_slabs(self, x: torch.Tensor, planes: int) -> torch.Tensor:
        """:meth:`forward` computed for ``planes`` input planes (along W) at a time; exact, the convolution is local."""
        n = x.shape[SLAB_AXIS]

        def piece(a: int, b: int) -> torch.Tensor:
            lo, hi = max(0, a - 1), min(n, b + 1)
            up = F.interpolate(_slab(x, lo, hi), scale_factor=2.0, mode="nearest")  # planes 2*lo : 2*hi
            return conv_slab(self.conv, up, 2 * (a - lo), 2 * (b - lo))

        return assemble(x, self.conv.out_channels, 2, planes, piece)


class TransposedUpsample3d(nn.Module):
    """Double every spatial size with a 4x4x4, stride-2 transposed convolution (the original 3D MedDiffusion's up step).

    About a third of the arithmetic of :class:`Upsample3d` (8 instead of 27 multiply-adds per output voxel and
    channel pair), since it works from the coarse grid.
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.ConvTranspose3d(channels, out_channels or channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C_out, 2D, 2H, 2W)``."""
        return self.conv(x)

    def forward_slabs(self, x: torch.Tensor, planes: int) -> torch.Tensor:
        """:meth:`forward` for ``planes`` input planes (along W) at a time; exact: output planes ``2a : 2b`` read
        only input planes ``a - 1 : b + 1``."""
        n = x.shape[SLAB_AXIS]

        def piece(a: int, b: int) -> torch.Tensor:
            lo, hi = max(0, a - 1), min(n, b + 1)
            up = self.conv(_slab(x, lo, hi))  # planes 2*lo : 2*hi (exact away from the cut ends)
            return up.narrow(SLAB_AXIS, 2 * (a - lo), 2 * (b - a))

        return assemble(x, self.conv.out_channels, 2, planes, piece)


UPSAMPLERS = {"nearest": Upsample3d, "transposed": TransposedUpsample3d}


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
