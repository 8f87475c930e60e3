"""Diagonal Gaussian bottleneck (KL autoencoder): mean / log-variance moments, reparameterised samples, KL."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in fp32 (the usual latent-diffusion bounds)


class GaussianOutput(NamedTuple):
    """What :class:`GaussianBottleneck` returns.

    Attributes:
        latent: ``(B, C, d, h, w)`` a reparameterised sample in training mode, the mean in eval mode.
        mean: ``(B, C, d, h, w)`` posterior mean (what ``encode`` hands to diffusion).
        logvar: ``(B, C, d, h, w)`` clamped posterior log-variance.
        kl_loss: scalar ``KL(q(z|x) || N(0, I))`` summed over latent elements, averaged over the batch.
    """

    latent: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    kl_loss: torch.Tensor


class GaussianBottleneck(nn.Module):
    """Splits encoder moments ``(B, 2C, d, h, w)`` into a diagonal Gaussian posterior and samples from it.

    Parameter-free. In ``train()`` mode the latent is ``mean + std * eps`` (reparameterisation trick, gradients
    flow to mean and log-variance); in ``eval()`` mode it is the mean, so validation is deterministic. The KL
    term is summed over channels and voxels and averaged over the batch, the convention of VAE / latent
    diffusion code, so ``kl_weight`` values such as 1e-6 carry over. Runs in fp32 under autocast.

    Args:
        channels: latent channels ``C`` (the encoder emits ``2 * C``).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels

    def split(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 2C, d, h, w)`` -> fp32 ``mean``, clamped ``logvar``, each ``(B, C, d, h, w)``."""
        if moments.ndim != 5 or moments.shape[1] != 2 * self.channels:
            raise ValueError(f"moments have shape {tuple(moments.shape)}, expected (B, {2 * self.channels}, d, h, w)")
        mean, logvar = moments.float().chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def forward(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> GaussianOutput:
        """Posterior of ``moments`` ``(B, 2C, d, h, w)``; see :class:`GaussianOutput`.

        Args:
            moments: encoder output, mean channels first, log-variance channels second.
            generator: optional RNG for the sample noise (reproducible training steps).
        """
        with torch.autocast(moments.device.type, enabled=False):
            mean, logvar = self.split(moments)
            if self.training:
                eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                latent = mean + torch.exp(0.5 * logvar) * eps
            else:
                latent = mean
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
            kl_loss = kl.flatten(1).sum(1).mean()
        return GaussianOutput(latent, mean, logvar, kl_loss)
