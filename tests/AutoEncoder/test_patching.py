"""Split/merge round trip and patch order, sliding decode against full decode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from AutoEncoder import PatchVolumeAutoencoder, merge_patches, sliding_decode, split_patches
from tests.AutoEncoder.conftest import tiny_config


@pytest.mark.parametrize("shape,patch", [((2, 1, 32, 32, 32), 16), ((1, 3, 16, 32, 8), 8), ((1, 1, 16, 24, 32), (16, 8, 32))])
def test_split_merge_identity(shape: tuple[int, ...], patch: int | tuple[int, int, int]) -> None:
    x = torch.randn(shape)
    patches, grid = split_patches(x, patch)
    assert torch.equal(merge_patches(patches, grid), x)
    p = (patch,) * 3 if isinstance(patch, int) else patch
    # first patch is the corner block; second is the next block along W
    assert torch.equal(patches[0], x[0, :, : p[0], : p[1], : p[2]])
    if grid[2] > 1:
        assert torch.equal(patches[1], x[0, :, : p[0], : p[1], p[2] : 2 * p[2]])


def test_split_keeps_small_axes_whole_and_rejects_bad_sizes() -> None:
    patches, grid = split_patches(torch.zeros(1, 1, 8, 32, 32), 16)
    assert patches.shape == (4, 1, 8, 16, 16) and grid == (1, 2, 2)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        split_patches(torch.zeros(1, 1, 24, 32, 32), 16)


class _LocalDecoder(nn.Module):
    """x4 'decoder' with a receptive field of two latent voxels each side (conv + trilinear) (no normalisation, no attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 2, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.conv(z), scale_factor=4, mode="trilinear")


@pytest.mark.parametrize("window,overlap", [(4, 0.25), (3, 0.5), ((8, 4, 5), 0.0)])
def test_sliding_decode_equals_full_decode_when_the_halo_covers_the_receptive_field(window, overlap) -> None:
    torch.manual_seed(0)
    dec = _LocalDecoder()
    z = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        full = dec(z)
        slid = sliding_decode(dec, z, window=window, overlap=overlap, halo=2)
        no_halo = sliding_decode(dec, z, window=window, overlap=overlap, halo=0)
    assert slid.shape == full.shape == (2, 2, 32, 32, 32)
    torch.testing.assert_close(slid, full, atol=1e-5, rtol=1e-5)
    assert (no_halo - full).abs().max() > 1e-2  # the context margin is what makes it exact


def _seam_ratio(vol: torch.Tensor, ref: torch.Tensor, borders: list[int]) -> float:
    """Mean jump of the error across ``borders`` (along W) over the mean jump elsewhere."""
    step = torch.diff(vol - ref, dim=-1).abs()[0, 0].mean(dim=(0, 1))  # (W-1,)
    inner = [i for i in range(step.numel()) if i not in borders]
    return float(step[borders].mean() / step[inner].mean())


def test_sliding_decode_of_the_real_decoder_is_close_and_seam_free() -> None:
    torch.manual_seed(0)
    model = PatchVolumeAutoencoder(**tiny_config(4, n_codes=0, decode_window=4, decode_overlap=0.5, decode_halo=3)).eval()
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 3, 3, 3), size=(8, 8, 8), mode="trilinear")
    with torch.no_grad():
        full = model.decoder(z)
        slid = model.decode(z)  # latent 8 > decode_window 4: slides
        tiles = torch.cat([model.decoder(z[..., :4]), model.decoder(z[..., 4:])], dim=-1)  # naive, no overlap
    assert slid.shape == full.shape == (1, 1, 32, 32, 32)
    # GroupNorm and attention use window statistics, so equality is approximate
    assert (slid - full).abs().mean() < 0.4 * full.std()
    # naive tiling jumps at its border (W=15|16); the blended decode shows no jump at its window borders
    assert _seam_ratio(tiles, full, [15]) > 1.2
    assert _seam_ratio(slid, full, [7, 15, 23]) < 1.2
