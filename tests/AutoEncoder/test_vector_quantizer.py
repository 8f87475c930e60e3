"""EMA codebook: data initialisation once, EMA updates only in training, dead-code restart, fp32, reloads."""

from __future__ import annotations

import pytest
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


def _hand_state(vq: VectorQuantizer) -> None:
    """Three 2-D codes: two near the data, one far away (nobody picks it)."""
    vq.embedding.copy_(torch.tensor([[0.0, 0.0], [4.0, 4.0], [50.0, 50.0]]))
    vq.cluster_size.copy_(torch.tensor([3.0, 1.0, 0.2]))
    vq.embed_sum.copy_(torch.tensor([[0.2, -0.2], [4.0, 4.0], [10.0, 10.0]]))
    vq.initialised.fill_(True)


# four latent vectors: (1, 0) and (0, 1) pick code 0, (5, 4) and (4, 6) pick code 1, nobody picks code 2
_HAND_Z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 4.0], [4.0, 6.0]]).T.reshape(1, 2, 1, 2, 2)


def _smoothed(sizes: list[float], eps: float) -> list[float]:
    total = sum(sizes)
    return [(s + eps) / (total + len(sizes) * eps) * total for s in sizes]


def test_ema_update_matches_a_hand_computation() -> None:
    vq = VectorQuantizer(3, 2, beta=0.25, decay=0.9, eps=0.5, dead_threshold=0.0).train()
    _hand_state(vq)
    out = vq(_HAND_Z)
    assert out.indices.flatten().tolist() == [0, 0, 1, 1]
    # outputs use the codes as they were before this batch's update
    torch.testing.assert_close(out.quantized.reshape(2, 4).T, torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 4.0], [4.0, 4.0]]))
    # commitment: beta * mean squared distance to the chosen codes, squared offsets (1, 0), (0, 1), (1, 0), (0, 4)
    assert out.commitment_loss.item() == pytest.approx(0.25 * (1 + 1 + 1 + 4) / 8)
    # cluster sizes: decay * old + (1 - decay) * counts, counts = (2, 2, 0)
    sizes = [0.9 * 3.0 + 0.1 * 2, 0.9 * 1.0 + 0.1 * 2, 0.9 * 0.2 + 0.1 * 0]  # 2.9, 1.1, 0.18
    torch.testing.assert_close(vq.cluster_size, torch.tensor(sizes))
    # embed sums: decay * old + (1 - decay) * sums, sums = ((1, 1), (9, 10), (0, 0))
    sums = [[0.9 * 0.2 + 0.1 * 1, 0.9 * -0.2 + 0.1 * 1], [0.9 * 4 + 0.1 * 9, 0.9 * 4 + 0.1 * 10], [0.9 * 10, 0.9 * 10]]
    torch.testing.assert_close(vq.embed_sum, torch.tensor(sums))
    # codes: embed sum / Laplace-smoothed size, (n + eps) / (N + K eps) * N with N = 4.18, K = 3, eps = 0.5
    smoothed = _smoothed(sizes, 0.5)
    expected = torch.tensor([[s / n for s in row] for row, n in zip(sums, smoothed)])
    torch.testing.assert_close(vq.embedding, expected)
    # without smoothing the far code would be 9 / 0.18 = 50; smoothing pulls it to 9 / 0.611
    assert vq.embedding[2, 0].item() == pytest.approx(9.0 / ((0.18 + 0.5) / (4.18 + 1.5) * 4.18))


def test_dead_code_restart_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(3, 2, decay=0.9, eps=0.5, dead_threshold=0.3).train()
    _hand_state(vq)
    vq(_HAND_Z)
    sizes = [2.9, 1.1, 0.18]  # as above: code 2 falls below the threshold 0.3
    sums = [[0.28, -0.08], [4.5, 4.6]]
    smoothed = _smoothed(sizes, 0.5)  # the dead code's old size still counts in N when live codes are smoothed
    torch.testing.assert_close(vq.embedding[:2], torch.tensor([[s / n for s in row] for row, n in zip(sums, smoothed)]))
    torch.testing.assert_close(vq.cluster_size, torch.tensor([2.9, 1.1, 0.3]))  # restarted at the threshold
    # the dead code becomes one of this batch's latent vectors, with a consistent EMA sum (vector * threshold)
    rows = _HAND_Z.reshape(2, 4).T
    new = vq.embedding[2]
    assert torch.isclose(rows, new).all(1).any(), f"restarted code {new.tolist()} is not a latent vector of the batch"
    torch.testing.assert_close(vq.embed_sum[2], new * 0.3)
    torch.testing.assert_close(vq.embed_sum[:2], torch.tensor(sums))
