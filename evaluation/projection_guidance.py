"""Projection-consistency guidance: steer latent diffusion sampling towards CTs whose DRRs match the input X-rays.

At a chosen subset of denoising steps the sampler's clean-latent estimate ``x0`` is decoded *with
gradients* by the autoencoder, its AP and lateral DRRs are rendered with the pair's geometry
(:func:`dataset.drr.render_drr_pair`, differentiable) and compared with the input X-rays; ``x0`` then moves
down the gradient of that projection loss, and the sampler continues from the corrected estimate with
the same implied noise (:meth:`ddpm.diffusion.Diffusion.sample`'s ``x0_hook``).

Why this form (manifold-preserving guidance, He et al. 2024, rather than DPS, Chung et al. 2023): the
gradient is taken w.r.t. ``x0`` only, not back through the denoiser, so a guided step costs one decoder
backward pass and no network backward pass, and the correction re-enters the sampler as a clean-latent
estimate that the following denoising steps keep on the learned manifold.

Step size: for each sample, ``x0 <- x0 - w * L / |grad L|^2 * grad L`` (a Polyak step): to first order it
removes the fraction ``w`` of the sample's projection loss ``L``, whatever the detector size, number of
pixels, latent size or scale of the loss, so one weight means the same on every model. ``w`` in (0, 1];
0 turns guidance off (the sampler then runs exactly as without it).

The loss is the mean squared difference of the rendered DRRs and the inputs on their [0, 1] scale, AP
and LAT averaged: the quantity whose PSNR ``evaluate`` reports as DRR consistency. The guidance renders
with diffdrr's trilinear integrator by default (twice as fast as Siddon with a backward pass, 49 dB from
Siddon on the demo CTs, see ``benchmarks/RESULTS.md``); the evaluation metric keeps Siddon, the data's
renderer.

Optional final refinement: ``refine_steps`` Adam steps on the decoded volume itself (voxel space), on
the projection loss relative to its starting value plus ``refine_prior`` times the mean squared change
from the generated CT; cheap (no decoder pass) and chosen over latent-space refinement by measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dataset.cli import check_range
from dataset.drr import RENDERERS, DRRGeometry, render_drr_pair
from dataset.intensity import HUWindow

__all__ = ["DEFAULT_GUIDANCE", "GuidanceSettings", "ProjectionGuidance", "projection_loss"]


@dataclass(frozen=True)
class GuidanceSettings:
    """How projection-consistency guidance runs (defaults chosen on the demo, see ``benchmarks/RESULTS.md``).

    Args:
        weight: fraction of each sample's projection loss a guided step removes (first order), in [0, 1];
            0 = off.
        steps: number of guided denoising steps (each costs one decoder forward + backward per sample).
        start: the guided steps are spread evenly from this fraction of the trajectory (0 = first step)
            to its last step, in [0, 1].
        refine_steps: Adam steps of the final voxel-space refinement (0 = none).
        refine_prior: weight of the stay-near-the-generated-CT term of the refinement (mean squared change
            on the [-1, 1] scale, against the projection loss relative to its starting value).
        refine_lr: Adam learning rate of the refinement on the [-1, 1] scale (0.01 = 10 HU per step).
        renderer: DRR integrator of the guidance (``"trilinear"`` or ``"siddon"``).
        quantize: decode guided estimates through the VQ codebook (straight-through gradient), as the final
            decode does; ignored by continuous autoencoders.
    """

    weight: float = 0.0
    steps: int = 4
    start: float = 0.5
    refine_steps: int = 0
    refine_prior: float = 1.0
    refine_lr: float = 0.01
    renderer: str = "trilinear"
    quantize: bool = True

    def __post_init__(self) -> None:
        check_range(self.weight, "projection_guidance", 0.0, 1.0)
        check_range(self.start, "guidance_start", 0.0, 1.0)
        check_range(self.refine_prior, "refine_prior", 0.0)
        check_range(self.refine_lr, "refine_lr", 0.0, min_open=True)
        for name, low in (("steps", 1), ("refine_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"guidance {name}={value!r} is invalid; expected an integer >= {low}")
        if self.renderer not in RENDERERS:
            raise ValueError(f"guidance renderer={self.renderer!r} is invalid; expected one of {RENDERERS}")

    @property
    def active(self) -> bool:
        """Whether sampling or the final refinement changes anything."""
        return self.weight > 0 or self.refine_steps > 0

    def step_indices(self, num_inference_steps: int) -> set[int]:
        """Indices (0 = first denoising step) of the guided steps of an ``num_inference_steps`` trajectory."""
        if self.weight == 0:
            return set()
        last = num_inference_steps - 1
        first = min(last, int(math.floor(self.start * num_inference_steps)))
        n = min(self.steps, last - first + 1)
        if n == 1:
            return {last}
        return {round(first + k * (last - first) / (n - 1)) for k in range(n)}


def projection_loss(volume: torch.Tensor, ap: torch.Tensor, lat: torch.Tensor, spacing: tuple[float, float, float],
                    geometry: DRRGeometry, window: HUWindow, renderer: str = "siddon") -> torch.Tensor:
    """Per-sample mean squared DRR error of volumes against their X-ray pair (AP and LAT averaged).

    Args:
        volume: ``(B, 1, D, H, W)`` in [-1, 1] (values beyond are clamped, as when saved).
        ap, lat: ``(B, 1, rows, cols)`` (or ``(1, rows, cols)``, shared) X-rays in [0, 1].
        spacing: voxel spacing ``(D, H, W)`` in mm.
        geometry: the pair's DRR geometry.
        window: HU window of the [-1, 1] scale.
        renderer: DRR integrator (:data:`dataset.drr.RENDERERS`).

    Returns:
        ``(B,)`` fp32 loss, differentiable w.r.t. ``volume``.
    """
    with torch.autocast(device_type=volume.device.type, enabled=False):  # the renderer runs in fp32
        drr_ap, drr_lat = render_drr_pair(volume.float().clamp(-1, 1), spacing, geometry, window, renderer=renderer)
        err = (drr_ap - ap.to(drr_ap)).pow(2).mean((1, 2, 3)) + (drr_lat - lat.to(drr_lat)).pow(2).mean((1, 2, 3))
    return err / 2


class ProjectionGuidance:
    """The guidance of one X-ray pair: an ``x0`` hook for the sampler plus the final refinement.

    Args:
        decode: normalised latent ``(B, C, d, h, w)`` -> volume ``(B, 1, D, H, W)`` in about [-1, 1], differentiable
            (the generator's de-normalise + ``autoencoder.decode``).
        ap, lat: the input X-rays ``(1, rows, cols)`` in [0, 1], on the detector grid of ``geometry``.
        spacing: voxel spacing ``(D, H, W)`` of the decoded volumes, mm.
        geometry: the pair's DRR geometry.
        window: HU window of the [-1, 1] scale.
        settings: weight, schedule, refinement, renderer.
        num_inference_steps: trajectory length (to place the guided steps).

    Attributes:
        history: per guided step, ``(step index, (B,) loss before the step)`` (for diagnostics and tests).
    """

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], ap: torch.Tensor, lat: torch.Tensor,
                 spacing: tuple[float, float, float], geometry: DRRGeometry, window: HUWindow,
                 settings: GuidanceSettings, num_inference_steps: int) -> None:
        for view, x in (("AP", ap), ("LAT", lat)):
            expected = geometry.view(view).detector_size
            if x.ndim != 3 or tuple(x.shape[1:]) != tuple(expected):
                raise ValueError(f"projection guidance: {view} X-ray has shape {tuple(x.shape)}; the DRR geometry "
                                 f"expects (1, {expected[0]}, {expected[1]})")
        self.decode = decode
        self.ap, self.lat = ap.float()[None], lat.float()[None]  # (1, 1, rows, cols), broadcast over samples
        self.spacing = tuple(float(s) for s in spacing)
        self.geometry = geometry
        self.window = window
        self.settings = settings
        self.guided_steps = settings.step_indices(num_inference_steps)
        self.history: list[tuple[int, torch.Tensor]] = []

    def loss(self, volume: torch.Tensor, renderer: str | None = None) -> torch.Tensor:
        """``(B,)`` projection loss of decoded volumes ``(B, 1, D, H, W)`` (see :func:`projection_loss`)."""
        n = volume.shape[0]
        return projection_loss(volume, self.ap.expand(n, -1, -1, -1), self.lat.expand(n, -1, -1, -1), self.spacing,
                               self.geometry, self.window, renderer or self.settings.renderer)

    def __call__(self, i: int, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
        """The sampler hook: a Polyak step on the projection loss at the guided steps, else None."""
        if i not in self.guided_steps:
            return None
        with torch.enable_grad():
            z = x0.detach().float().requires_grad_(True)
            loss = self.loss(self.decode(z))
            (grad,) = torch.autograd.grad(loss.sum(), z)
        self.history.append((i, loss.detach().cpu()))
        norm2 = grad.pow(2).flatten(1).sum(1).clamp_min(torch.finfo(grad.dtype).tiny)
        scale = self.settings.weight * loss.detach() / norm2  # (B,) Polyak step size per sample
        return x0 - scale.reshape(-1, *([1] * (x0.ndim - 1))) * grad

    def refine(self, volume: torch.Tensor) -> torch.Tensor:
        """The final voxel-space refinement of decoded volumes ``(B, 1, D, H, W)`` in [-1, 1] (same shape back)."""
        s = self.settings
        if s.refine_steps == 0:
            return volume
        start = volume.detach().float().clamp(-1, 1)
        with torch.enable_grad():
            v = start.clone().requires_grad_(True)
            opt = torch.optim.Adam([v], lr=s.refine_lr)
            loss0 = self.loss(start).clamp_min(1e-12)
            for _ in range(s.refine_steps):
                opt.zero_grad(set_to_none=True)
                prior = (v - start).pow(2).flatten(1).mean(1)
                total = (self.loss(v) / loss0 + s.refine_prior * prior).sum()
                total.backward()
                opt.step()
        return v.detach().clamp(-1, 1).to(volume.dtype)


#: What ``generate_ct`` and the demo use unless told otherwise (chosen on the demo, ``benchmarks/RESULTS.md``).
DEFAULT_GUIDANCE = GuidanceSettings(weight=1.0)
