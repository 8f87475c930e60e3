"""Shapes at 4x/8x, patch-wise encoding, continuous mode, latent normalisation, stage-2 freezing."""

from __future__ import annotations

import pytest
import torch

from AutoEncoder import AutoencoderOutput, PatchVolumeAutoencoder, merge_patches, split_patches
from tests.AutoEncoder.conftest import tiny_config


@pytest.mark.parametrize("factor", [4, 8])
@pytest.mark.parametrize("n_codes", [16, 0])
def test_shapes(factor: int, n_codes: int) -> None:
    model = PatchVolumeAutoencoder(**tiny_config(factor, n_codes=n_codes, downsample=[factor] * 3))
    x = torch.rand(2, 1, 32, 32, 16) * 2 - 1
    out = model(x)
    assert isinstance(out, AutoencoderOutput)
    assert model.downsample_factor == factor and model.latent_channels == 4
    assert out.reconstruction.shape == x.shape
    assert out.latent.shape == (2, 4, 32 // factor, 32 // factor, 16 // factor)
    assert model.encode(x).shape == out.latent.shape
    assert model.decode(out.latent).shape == x.shape
    assert model.is_quantized == (n_codes > 0)
    if n_codes == 0:
        assert out.commitment_loss.item() == 0.0


def test_downsample_mismatch_and_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="does not match channels"):
        PatchVolumeAutoencoder(**tiny_config(4, downsample=8))
    model = PatchVolumeAutoencoder(**tiny_config(4))
    with pytest.raises(ValueError, match="multiple of 4"):
        model.encode(torch.zeros(1, 1, 16, 16, 18))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        model.encode(torch.zeros(1, 16, 16, 16))


def test_encoding_is_patch_wise_and_chunk_size_independent() -> None:
    torch.manual_seed(0)
    model = PatchVolumeAutoencoder(**tiny_config(4, encode_chunk_size=1)).eval()
    x = torch.rand(1, 1, 32, 32, 32) * 2 - 1
    with torch.no_grad():
        z1 = model.encode(x)
        model.encode_chunk_size = 8
        z8 = model.encode(x)
        patches, grid = split_patches(x, 16)
        by_hand = merge_patches(model.encoder(patches), grid)
        # changing one patch changes only its own latent block
        y = x.clone()
        y[..., :16, :16, :16] = 0
        zy = model.encode(y)
    torch.testing.assert_close(z1, z8, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z1, by_hand, atol=1e-5, rtol=1e-5)
    changed = (zy - z1).abs().amax(dim=(0, 1)) > 1e-4  # (8, 8, 8)
    assert changed[:4, :4, :4].all() and not changed[4:].any() and not changed[:, 4:].any()


def test_freeze_encoder_keeps_encoder_and_codebook_fixed() -> None:
    torch.manual_seed(0)
    model = PatchVolumeAutoencoder(**tiny_config(4))
    model.train()
    model(torch.rand(2, 1, 16, 16, 16) * 2 - 1)  # initialises the codebook
    model.freeze_encoder()
    model.train()
    assert not model.encoder.training and not model.quantizer.training and model.decoder.training
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    out = model(torch.rand(2, 1, 16, 16, 16) * 2 - 1)
    (out.reconstruction.mean() + out.commitment_loss).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
