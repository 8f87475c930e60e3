"""Latent diffusion sampling + volume-wise decoding: the one generation path every CLI uses.

A :class:`CTGenerator` holds a trained BiFlowNet (EMA weights) and the frozen autoencoder whose latent
space it was trained in. ``sample`` draws latents with the chosen sampler (optionally with
classifier-free guidance and projection-consistency guidance towards the X-rays,
:mod:`evaluation.projection_guidance`), de-normalises them and decodes them to ``(K, 1, D, H, W)`` volumes in
[-1, 1]; ``to_hu_image`` turns one into a TorchIO image in HU with the training spacing, ready to be
written as NIfTI.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchio as tio

from AutoEncoder import LoadedAutoencoder, PatchVolumeAutoencoder, load_autoencoder
from dataset import DatasetInfo, DRRGeometry, HUWindow, volume_to_image
from dataset.cli import parse_device
from ddpm import LoadedBiFlowNet, guided, load_biflownet
from evaluation.projection_guidance import GuidanceSettings, ProjectionGuidance

SAMPLERS = ("ddim", "ddpm", "rflow")


def default_device() -> torch.device:
    """CUDA when available, else CPU (:func:`dataset.cli.parse_device` of no value)."""
    return parse_device(None)


@dataclass
class CTGenerator:
    """A BiFlowNet + autoencoder pair that turns (X-rays, label) into CT volumes.

    Attributes:
        biflownet: loaded BiFlowNet (model in eval mode, diffusion settings, latent statistics).
        autoencoder: frozen autoencoder whose latent space the BiFlowNet was trained in.
        window: HU window of the training data ([-1, 1] <-> HU).
        spacing: voxel spacing (D, H, W) in mm of the training preprocessing.
        device: where sampling runs.
        bf16: run the networks under bf16 autocast (CUDA only; sampler arithmetic stays fp32).
    """

    biflownet: LoadedBiFlowNet
    autoencoder: PatchVolumeAutoencoder
    window: HUWindow
    spacing: tuple[float, float, float]
    device: torch.device
    bf16: bool = False

    @classmethod
    def from_checkpoints(cls, checkpoint: str | os.PathLike, autoencoder: str | os.PathLike | None = None,
                         device: str | torch.device | None = None, bf16: bool | None = None,
                         adapter: str | os.PathLike | None = None) -> "CTGenerator":
        """Load both networks and check that they belong together.

        Args:
            checkpoint: BiFlowNet checkpoint (``train.train_BiFlowNet``).
            autoencoder: autoencoder checkpoint; default: the one recorded in the BiFlowNet checkpoint.
            device: default CUDA when available.
            bf16: default True on CUDA.
            adapter: LoRA adapter folder (``experiment=biflownet_lora``) trained on ``checkpoint``; it is
                merged into the weights before sampling.

        Raises:
            FileNotFoundError: a checkpoint (or the adapter folder) is missing.
            ValueError: a checkpoint of the wrong kind, the two do not fit each other, or the adapter
                does not fit the BiFlowNet.
        """
        device = torch.device(device) if device is not None else default_device()
        loaded = load_biflownet(checkpoint, map_location=device, adapter=adapter)
        if autoencoder is None:
            autoencoder = (loaded.hparams.get("latent_stats") or {}).get("ae_checkpoint")
            if not autoencoder:
                raise ValueError(f"{checkpoint}: records no autoencoder checkpoint; pass --autoencoder PATH")
            if not Path(autoencoder).is_file():
                raise FileNotFoundError(f"{checkpoint}: the autoencoder it was trained with, {autoencoder}, does not "
                                        "exist (moved?); pass --autoencoder PATH")
        ae = load_autoencoder(autoencoder, map_location=device)
        check_compatible(loaded, ae, checkpoint, autoencoder)
        info = ae.dataset_info or {}
        if "window" not in info or "spacing" not in info:
            raise ValueError(f"{autoencoder}: stores no dataset description (window, spacing); "
                             "retrain it with a prepared dataset (dataset.json next to the manifest)")
        window = HUWindow.from_dict(info["window"])
        spacing = tuple(float(s) for s in info["spacing"])
        bf16 = (device.type == "cuda") if bf16 is None else bool(bf16)
        if bf16 and device.type != "cuda":
            raise ValueError(f"bf16 sampling needs a CUDA device; got device={device}")
        return cls(loaded, ae.model, window, spacing, device, bf16)

    @property
    def needs_xrays(self) -> bool:
        return self.biflownet.conditioning["xray_size"] is not None

    @property
    def num_classes(self) -> int:
        return int(self.biflownet.conditioning["num_classes"])

    def check_xrays(self, ap: torch.Tensor, lat: torch.Tensor, name: str = "X-ray pair") -> None:
        """Raise ``ValueError`` unless ``ap``/``lat`` are a ``(1, H, W)`` pair of the trained size in [0, 1]."""
        expected = tuple(self.biflownet.conditioning["xray_size"] or ())
        for view, x in (("AP", ap), ("LAT", lat)):
            if x.ndim != 3 or x.shape[0] != 1:
                raise ValueError(f"{name}: {view} has shape {tuple(x.shape)}; expected (1, H, W)")
            if tuple(x.shape[1:]) != expected:
                raise ValueError(f"{name}: {view} is {tuple(x.shape[1:])} pixels; the model was trained on {expected}")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name}: {view} has NaN or Inf pixels")
            if float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3:
                raise ValueError(f"{name}: {view} values span [{float(x.min()):.3g}, {float(x.max()):.3g}]; "
                                 "expected a radiograph normalised to [0, 1]")

    @property
    def training_geometry(self) -> DRRGeometry | None:
        """DRR geometry of the training X-rays (the default pair geometry), or None when it is unknown.

        The BiFlowNet checkpoint's own record comes first; older checkpoints fall back to the dataset
        description stored in the autoencoder.
        """
        geometry = getattr(self.biflownet, "geometry", None)
        if geometry is not None:
            return geometry
        stored = (getattr(self.autoencoder, "dataset_info", None) or {}).get("geometry")
        return DRRGeometry.from_dict(stored) if stored else None

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Normalised latents ``(B, C, d, h, w)`` -> volumes ``(B, 1, D, H, W)`` (about [-1, 1], not clamped)."""
        return self.autoencoder.decode(self.biflownet.denormalize(z.float()), quantize=quantize)

    def _autocast(self):
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def sample(self, ap: torch.Tensor | None = None, lat: torch.Tensor | None = None, label: int | None = None,
               num_samples: int = 1, sampler: str = "ddim", num_inference_steps: int = 50,
               guidance_scale: float = 1.0, generator: torch.Generator | None = None,
               batch_size: int | None = None, *, projection_guidance: float | GuidanceSettings = 0.0,
               geometry: DRRGeometry | None = None) -> torch.Tensor:
        """Draw ``num_samples`` volumes for one condition.

        Args:
            ap, lat: ``(1, H, W)`` X-rays in [0, 1] for an X-ray-conditioned model (ignored otherwise);
                leave both out to sample unconditionally from the learned null X-ray tokens.
            label: class label (required by a class-conditional model, else ignored).
            num_samples: K volumes from independent noise.
            sampler: ``"ddim"``, ``"ddpm"`` or ``"rflow"`` (must fit the trained process).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale (1 = the conditional model alone).
            generator: CPU ``torch.Generator`` for the starting noise and stochastic samplers.
            batch_size: samples per network batch (default all K at once); also bounds the memory of
                projection guidance (decoder activations of one batch).
            projection_guidance: weight in [0, 1] of projection-consistency guidance towards ``ap``/``lat``
                (0 = off, bit-identical to sampling without it), or a full
                :class:`~evaluation.projection_guidance.GuidanceSettings` (schedule, refinement, renderer).
            geometry: DRR geometry of the given X-ray pair (on the model's detector grid); None = the
                training geometry (:attr:`training_geometry`).

        Returns:
            float32 ``(K, 1, D, H, W)`` volumes in [-1, 1] on the CPU.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is invalid; expected one of {SAMPLERS}")
        if num_samples < 1 or num_inference_steps < 1:
            raise ValueError(f"num_samples={num_samples} and num_inference_steps={num_inference_steps} must be >= 1")
        cond: dict[str, torch.Tensor] = {}
        # an X-ray model without X-rays samples unconditionally from its learned null tokens
        unconditional = self.needs_xrays and ap is None and lat is None
        if self.needs_xrays and not unconditional:
            if ap is None or lat is None:
                raise ValueError("give both an AP and a LAT image (or neither, for unconditional sampling)")
            self.check_xrays(ap, lat)
        if unconditional and guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs X-rays to guide towards; use 1.0 without them")
        if self.num_classes > 0 and not (unconditional and label is None):  # null tokens drop the class too
            if label is None or not 0 <= int(label) < self.num_classes:
                raise ValueError(f"label={label!r} is invalid; expected an integer in [0, {self.num_classes})")
        settings = (projection_guidance if isinstance(projection_guidance, GuidanceSettings)
                    else GuidanceSettings(weight=projection_guidance))
        guide_geometry = geometry or self.training_geometry  # the network keeps its own when none is given
        if settings.active:
            if ap is None or lat is None:
                raise ValueError(f"projection_guidance={settings.weight:g} (refine_steps={settings.refine_steps}) "
                                 "needs an AP and a LAT X-ray to agree with; use 0 without them")
            if guide_geometry is None:
                raise ValueError("projection guidance needs the DRR geometry of the X-rays, and the checkpoints "
                                 "record none; pass a geometry or turn guidance off (projection_guidance=0)")
        cfg = self.biflownet.conditioning
        shape = (cfg["latent_channels"], *cfg["latent_shape"])
        generator = generator or torch.Generator().manual_seed(0)
        step = batch_size or num_samples
        out = []
        for start in range(0, num_samples, step):
            k = min(step, num_samples - start)
            if self.num_classes > 0:
                cond["y"] = torch.full((k,), int(label or 0), dtype=torch.long, device=self.device)
            if unconditional:
                blank = torch.zeros((k, 1, *self.biflownet.conditioning["xray_size"]), device=self.device)
                drop = torch.ones(k, dtype=torch.bool, device=self.device)
                model_fn = partial(self.biflownet.model, ap=blank, lat=blank, drop=drop, **cond)
            else:
                if self.needs_xrays:
                    cond["ap"] = ap[None].expand(k, -1, -1, -1).to(self.device)
                    cond["lat"] = lat[None].expand(k, -1, -1, -1).to(self.device)
                    if geometry is not None:
                        cond["geometry"] = geometry.to_tensor()[None].expand(k, -1, -1).to(self.device)
                model_fn = guided(self.biflownet.model, guidance_scale, **cond)
            noise = torch.randn((k, *shape), generator=generator).to(self.device)
            gen = generator if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(
                int(torch.randint(0, 2**62, (1,), generator=generator)))
            hook = None
            if settings.active:
                hook = ProjectionGuidance(partial(self.decode, quantize=settings.quantize), ap.to(self.device),
                                          lat.to(self.device), self.spacing, guide_geometry, self.window, settings,
                                          num_inference_steps)
            with self._autocast():
                z = self.biflownet.diffusion.sample(
                    model_fn, noise, gen, num_inference_steps=num_inference_steps, sampler=sampler,
                    x0_hook=hook if settings.weight > 0 else None)
                x = self.decode(z, quantize=True)
            x = x.float().clamp(-1, 1)
            if hook is not None:
                x = hook.refine(x)
            out.append(x.cpu())
        return torch.cat(out)

    def to_hu_image(self, volume: torch.Tensor) -> tio.ScalarImage:
        """``(1, D, H, W)`` volume in [-1, 1] -> TorchIO image in HU with the training spacing (LPI)."""
        return volume_to_image(self.window.to_hu(volume), self.spacing)

    def std_hu_image(self, volumes: torch.Tensor) -> tio.ScalarImage:
        """Per-voxel standard deviation in HU of ``(K, 1, D, H, W)`` samples, as an image."""
        return volume_to_image(self.window.to_hu(volumes).std(dim=0, unbiased=volumes.shape[0] > 1), self.spacing)


def check_compatible(loaded: LoadedBiFlowNet, ae: LoadedAutoencoder | PatchVolumeAutoencoder, ckpt: object,
                     ae_ckpt: object) -> None:
    """Raise ``ValueError`` when the BiFlowNet was not trained in this autoencoder's latent space.

    Checks the latent channels and, when both are known, the fingerprint of the autoencoder that made the
    training latents against the one given.
    """
    model = ae.model if isinstance(ae, LoadedAutoencoder) else ae
    cfg = loaded.conditioning
    if int(cfg["latent_channels"]) != model.latent_channels:
        raise ValueError(f"{ckpt} expects {cfg['latent_channels']} latent channels but autoencoder {ae_ckpt} "
                         f"produces {model.latent_channels}; use the autoencoder the latents were made with")
    trained_on = (loaded.hparams.get("latent_stats") or {}).get("ae_fingerprint")
    if isinstance(ae, LoadedAutoencoder) and trained_on and trained_on != ae.fingerprint:
        raise ValueError(f"{ckpt} was trained on latents of autoencoder {trained_on[:12]}, but {ae_ckpt} is autoencoder "
                         f"{ae.fingerprint[:12]}; use the autoencoder the latents were made with")


__all__ = ["CTGenerator", "SAMPLERS", "check_compatible", "default_device"]
