"""EMA codebook: data initialisation once, EMA updates only in training, dead-code restart, fp32, reloads."""

from __future__ import annotations

import torch

from AutoEncoder import VectorQuantizer


def _latent(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 4, 4, 4, generator=g)


def test_initialises_from_data_once_and_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, decay=0.9).train()
    z = _latent().requires_grad_(True)
    assert not bool(vq.initialised)
    out = vq(z)
    assert bool(vq.initialised)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 4, 4, 4)
    assert 1.0 <= out.perplexity.item() <= 16.0 and 0.0 < out.usage.item() <= 1.0
    # straight-through: the gradient reaches the encoder output
    (out.quantized.sum() + out.commitment_loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    snapshot = vq.embedding.clone()
    vq(_latent(1))
    assert not torch.equal(snapshot, vq.embedding)  # EMA moved, no second initialisation
    vq.eval()
    out = vq(_latent(2))
    torch.testing.assert_close(out.quantized, vq.codes_to_vectors(out.indices))  # outputs are codebook rows
    d2 = torch.cdist(_latent(2).permute(0, 2, 3, 4, 1).reshape(-1, 4), vq.embedding)
    assert torch.equal(out.indices.flatten(), d2.argmin(1))  # ... the nearest ones


def test_eval_and_frozen_do_not_touch_buffers() -> None:
    vq = VectorQuantizer(16, 4).train()
    vq(_latent())
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(_latent(1))
    vq.train()
    vq.frozen = True
    vq(_latent(2))
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in state.items())


def test_dead_codes_are_restarted_from_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, decay=0.5, dead_threshold=0.5).train()
    vq(_latent())
    vq.embedding[0] = 1e3  # a code nobody will choose
    vq.embed_sum[0] = 1e3
    vq.cluster_size[0] = 0.1
    z = _latent(3)
    vq(z)
    flat = z.permute(0, 2, 3, 4, 1).reshape(-1, 4)
    assert torch.cdist(vq.embedding[:1], flat).min() < 1e-5  # replaced by an actual latent vector
    assert vq.cluster_size[0] >= 0.5


def test_state_survives_reload_without_reinitialisation() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4).train()
    vq(_latent())
    fresh = VectorQuantizer(16, 4)
    fresh.load_state_dict(vq.state_dict())
    assert bool(fresh.initialised)
    vq.eval()
    fresh.eval()
    assert torch.equal(vq(_latent(5)).indices, fresh(_latent(5)).indices)
    # training continues with EMA, no re-initialisation from data: both copies move identically
    vq.train()
    fresh.train()
    torch.manual_seed(1)
    vq(_latent(6))
    torch.manual_seed(1)
    fresh(_latent(6))
    assert torch.equal(vq.embedding, fresh.embedding)


def test_fp32_under_bf16_autocast() -> None:
    vq = VectorQuantizer(16, 4).train()
    z = _latent().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.quantized.dtype == torch.bfloat16
    assert vq.embedding.dtype == torch.float32 and out.commitment_loss.dtype == torch.float32
