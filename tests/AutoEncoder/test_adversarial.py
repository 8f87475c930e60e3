"""Hinge losses and the adaptive adversarial weight against hand computations."""

from __future__ import annotations

import pytest
import torch

from AutoEncoder import adaptive_weight, hinge_d_loss, hinge_g_loss


def test_hinge_losses_by_hand() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-3.0, 0.0])  # relu(1 + fake) = 0, 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1) / 2))
    assert hinge_g_loss(fake).item() == pytest.approx(1.5)


def test_adaptive_weight_by_hand() -> None:
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]], requires_grad=True)  # ||w|| = 5
    a = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # ||a|| = 5
    rec = (a * w).sum()  # d rec / d w = a
    adv = 0.5 * 0.1 * (w**2).sum()  # d adv / d w = 0.1 w, norm 0.5
    weight = adaptive_weight(rec, adv, w)
    assert weight.item() == pytest.approx(5.0 / (0.5 + 1e-4))
    assert not weight.requires_grad  # a constant factor for the generator loss
    # both graphs are kept for the backward pass that follows
    (rec + weight * adv).backward()
    torch.testing.assert_close(w.grad, a + weight * 0.1 * w.detach())
    # a vanishing adversarial gradient is capped at max_weight
    w2 = torch.tensor([1.0, 1.0], requires_grad=True)
    capped = adaptive_weight((w2 * 3).sum(), (w2 * 1e-9).sum(), w2, max_weight=100.0)
    assert capped.item() == pytest.approx(100.0)
