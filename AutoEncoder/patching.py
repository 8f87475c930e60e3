"""Patch-wise encoding helpers (split a volume into fixed patches and merge them back) and sliding decode."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from einops import rearrange


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    t = (v, v, v) if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"expected a positive int or three positive ints, got {v!r}")
    return t  # type: ignore[return-value]


def grid_for(spatial: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    """Patch size actually used per axis: ``min(patch, size)``; each size must be a multiple of it.

    Args:
        spatial: ``(D, H, W)`` of the volume.
        patch_size: requested patch size (int or per axis).

    Returns:
        The per-axis patch size.

    Raises:
        ValueError: if an axis is not a multiple of its patch size.
    """
    patch = _triple(patch_size)
    eff = tuple(min(p, s) for p, s in zip(patch, spatial))
    for axis, s, p in zip("DHW", spatial, eff):
        if s % p:
            raise ValueError(f"volume size {tuple(spatial)} is not a multiple of the patch size {eff} along {axis}")
    return eff  # type: ignore[return-value]


def split_patches(x: torch.Tensor, patch_size: int | Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Cut a volume into non-overlapping patches.

    Args:
        x: ``(B, C, D, H, W)``.
        patch_size: patch edge (int or per axis); axes smaller than it are kept whole.

    Returns:
        ``(B * nd * nh * nw, C, pd, ph, pw)`` patches (batch-major, then D, H, W order) and the grid
        ``(nd, nh, nw)`` needed by :func:`merge_patches`.
    """
    pd, ph, pw = grid_for(x.shape[2:], patch_size)
    nd, nh, nw = x.shape[2] // pd, x.shape[3] // ph, x.shape[4] // pw
    patches = rearrange(x, "b c (nd pd) (nh ph) (nw pw) -> (b nd nh nw) c pd ph pw", pd=pd, ph=ph, pw=pw)
    return patches, (nd, nh, nw)


def merge_patches(patches: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`split_patches`: ``(B * nd * nh * nw, C, pd, ph, pw) -> (B, C, nd*pd, nh*ph, nw*pw)``."""
    nd, nh, nw = grid
    return rearrange(patches, "(b nd nh nw) c pd ph pw -> b c (nd pd) (nh ph) (nw pw)", nd=nd, nh=nh, nw=nw)


def _tiles(n: int, core: int, overlap: int) -> list[int]:
    """Start positions of windows of size ``core`` covering ``[0, n)`` with at least ``overlap`` shared voxels."""
    if core >= n:
        return [0]
    step = max(core - overlap, 1)
    starts = list(range(0, n - core, step))
    return starts + [n - core]


def _ramp(length: int, ramp_in: int, ramp_out: int, device: torch.device) -> torch.Tensor:
    """1D blending weight: linear rise over ``ramp_in`` voxels, 1 in the middle, linear fall over ``ramp_out``."""
    w = torch.ones(length, device=device)
    if ramp_in > 0:
        w[:ramp_in] = (torch.arange(ramp_in, device=device) + 0.5) / ramp_in
    if ramp_out > 0:
        w[length - ramp_out :] = torch.minimum(w[length - ramp_out :], (torch.arange(ramp_out, 0, -1, device=device) - 0.5) / ramp_out)
    return w


def sliding_decode(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    window: int | Sequence[int],
    overlap: float = 0.25,
    halo: int | Sequence[int] = 2,
) -> torch.Tensor:
    """Decode a large latent window by window with context margins and linear blending of the overlaps.

    Each window (``window`` latent voxels per axis) is decoded together with ``halo`` extra latent voxels of
    context on every side that the volume allows; the output of that margin is cut away, so a window's
    interior sees (almost) what the full decoder sees. Neighbouring windows share ``overlap * window`` latent
    voxels, where their outputs are cross-faded with linear ramps, so no seam remains. For a decoder whose
    receptive field fits inside the halo the result equals the full decode exactly; with GroupNorm and
    attention (global statistics) it is close. Written here because MONAI's ``sliding_window_inference``
    blends whole windows, including their poorly-informed borders, and has no context margin.
    Memory is bounded by one window of ``window + 2 * halo`` latent voxels per axis.

    Args:
        decode_fn: latent ``(B, C, d', h', w')`` -> volume ``(B, C_out, d'*f, h'*f, w'*f)``.
        z: latent ``(B, C, d, h, w)``.
        window: latent window size (int or per axis).
        overlap: fraction of the window shared with each neighbour, in [0, 1).
        halo: latent voxels of context decoded and discarded on each side (int or per axis).

    Returns:
        ``(B, C_out, d*f, h*f, w*f)``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    sizes = tuple(z.shape[2:])
    core = tuple(min(c, n) for c, n in zip(_triple(window), sizes))
    halos = (halo,) * 3 if isinstance(halo, int) else tuple(halo)
    if min(halos) < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    ov = tuple(int(round(overlap * c)) for c in core)
    starts = [_tiles(n, c, o) for n, c, o in zip(sizes, core, ov)]
    out: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    f = 0
    for sd in starts[0]:
        for sh in starts[1]:
            for sw in starts[2]:
                lo = [max(0, s - h) for s, h in zip((sd, sh, sw), halos)]
                hi = [min(n, s + c + h) for s, c, h, n in zip((sd, sh, sw), core, halos, sizes)]
                piece = decode_fn(z[:, :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
                if out is None:
                    f = piece.shape[2] // (hi[0] - lo[0])
                    out = piece.new_zeros(piece.shape[:2] + tuple(n * f for n in sizes))
                    weight = piece.new_zeros((1, 1) + tuple(n * f for n in sizes))
                # crop the halo: keep the window core only
                a = [(s - l) * f for s, l in zip((sd, sh, sw), lo)]
                piece = piece[:, :, a[0] : a[0] + core[0] * f, a[1] : a[1] + core[1] * f, a[2] : a[2] + core[2] * f]
                ramps = []
                for axis, s in enumerate((sd, sh, sw)):
                    r_in = ov[axis] * f if s > 0 else 0
                    r_out = ov[axis] * f if s + core[axis] < sizes[axis] else 0
                    ramps.append(_ramp(core[axis] * f, r_in, r_out, piece.device).to(piece.dtype))
                w = ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]
                region = (slice(None), slice(None)) + tuple(slice(s * f, (s + c) * f) for s, c in zip((sd, sh, sw), core))
                out[region] += piece * w
                weight[region] += w
    assert out is not None and weight is not None
    return out / weight
