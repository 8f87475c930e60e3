"""Rebuild a trained BiFlowNet (EMA weights) and its diffusion settings from a checkpoint alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm.biflownet import BiFlowNet
from ddpm.diffusion import Diffusion


@dataclass
class LoadedBiFlowNet:
    """What generation code needs from a BiFlowNet checkpoint.

    Attributes:
        model: BiFlowNet in eval mode (EMA weights unless asked otherwise).
        diffusion: Diffusion process with the training configuration.
        latent_mean, latent_std: (1, C, 1, 1, 1) statistics; raw latent = normalised * std + mean.
        conditioning: plain dict: num_classes, xray_size (H, W) or None, cross_attention,
            back_projection, latent_shape (D, H, W), latent_channels, p_uncond, step.
        hparams: the module's stored hyper-parameters.
    """

    model: BiFlowNet
    diffusion: Diffusion
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    conditioning: dict
    hparams: dict = field(default_factory=dict)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised sample (B, C, D, H, W) -> raw autoencoder latent for decoding."""
        return z * self.latent_std.to(z) + self.latent_mean.to(z)


def load_biflownet(
    ckpt_path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = True
) -> LoadedBiFlowNet:
    """Load a checkpoint written by ``train.train_BiFlowNet`` (``torch.load(weights_only=True)``).

    Args:
        ckpt_path: Lightning ``.ckpt`` file.
        map_location: device for the tensors.
        use_ema: load the EMA weights (default) or the raw training weights.

    Returns:
        :class:`LoadedBiFlowNet`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a BiFlowNet checkpoint.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: BiFlowNet checkpoint not found")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "network" not in hp or "diffusion" not in hp:
        raise ValueError(f"{path}: not a BiFlowNet checkpoint (expected state_dict and network/diffusion hyper-parameters)")
    prefix = "ema_model." if use_ema else "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no '{prefix}*' weights in the checkpoint")
    model = BiFlowNet(**hp["network"])
    model.load_state_dict(state)
    model.to(map_location).eval().requires_grad_(False)
    sd = ckpt["state_dict"]
    xr = model.xray_encoder
    conditioning = {
        "num_classes": model.num_classes,
        "xray_size": list(xr.image_size) if xr is not None else None,
        "cross_attention": model.cross_attention,
        "back_projection": model.back_projection,
        "latent_shape": list(model.latent_shape),
        "latent_channels": model.in_channels,
        "p_uncond": hp.get("p_uncond"),
        "step": int(ckpt.get("global_step", 0)),
    }
    return LoadedBiFlowNet(
        model=model,
        diffusion=Diffusion(**hp["diffusion"]),
        latent_mean=sd["latent_mean"],
        latent_std=sd["latent_std"],
        conditioning=conditioning,
        hparams=dict(hp),
    )


__all__ = ["LoadedBiFlowNet", "load_biflownet"]
