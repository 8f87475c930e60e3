"""Adversarial part of the autoencoder loss: 3D patch discriminator, hinge losses, adaptive weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator
from torch import nn


def build_discriminator(in_channels: int = 1, channels: int = 64, num_layers: int = 3, norm: str = "INSTANCE") -> nn.Module:
    """MONAI 3D PatchDiscriminator (PatchGAN); call it and take ``[-1]`` for the ``(B, 1, d, h, w)`` logits."""
    return PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=in_channels, num_layers_d=num_layers, norm=norm)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``mean(relu(1 - real)) + mean(relu(1 + fake))``, halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: ``-mean(fake logits)``."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """Weight balancing the adversarial gradient against the reconstruction gradient at the decoder output layer.

    ``||grad rec|| / (||grad g|| + 1e-4)``, clamped to ``[0, max_weight]`` and detached (Esser et al., VQGAN).
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
