"""Rebuild a trained BiFlowNet (EMA weights) and its diffusion settings from a checkpoint alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataset.drr import DRRGeometry
from ddpm.biflownet import BiFlowNet
from ddpm.diffusion import Diffusion


@dataclass
class LoadedBiFlowNet:
    """What generation code needs from a BiFlowNet checkpoint.

    Attributes:
        model: BiFlowNet in eval mode (EMA weights unless asked otherwise; a peft ``PeftModel`` around it
            when loaded with an unmerged adapter).
        diffusion: Diffusion process with the training configuration.
        latent_mean, latent_std: (1, C, 1, 1, 1) statistics; raw latent = normalised * std + mean.
        conditioning: plain dict: num_classes, xray_size (H, W) or None, cross_attention,
            back_projection, latent_shape (D, H, W), latent_channels, p_uncond, step.
        hparams: the module's stored hyper-parameters.
        geometry: the training default DRR geometry (``dataset.drr.DRRGeometry``) stored with the
            weights, or None (no X-ray conditioning, or X-rays without a known geometry).
    """

    model: BiFlowNet
    diffusion: Diffusion
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    conditioning: dict
    hparams: dict = field(default_factory=dict)
    geometry: DRRGeometry | None = None

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised sample (B, C, D, H, W) -> raw autoencoder latent for decoding."""
        return z * self.latent_std.to(z) + self.latent_mean.to(z)


def load_biflownet(
    ckpt_path: str | Path,
    map_location: str | torch.device = "cpu",
    use_ema: bool = True,
    adapter: str | Path | None = None,
    merge_adapter: bool = True,
) -> LoadedBiFlowNet:
    """Load a checkpoint written by ``train.train_BiFlowNet`` (``torch.load(weights_only=True)``).

    A checkpoint of a LoRA fine-tuning run holds base and adapter weights; it loads as the adapted
    network with the adapters merged.

    Args:
        ckpt_path: Lightning ``.ckpt`` file.
        map_location: device for the tensors.
        use_ema: load the EMA weights (default) or the raw training weights.
        adapter: LoRA adapter folder (``ddpm.lora.save_adapter``) to apply to these base weights.
        merge_adapter: fold the adapter into the weights (faster sampling) or keep adapter layers.

    Returns:
        :class:`LoadedBiFlowNet`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a BiFlowNet checkpoint, or the adapter does not fit it.
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
    if hp.get("lora"):
        from ddpm.lora import LoraSettings, apply_lora

        if adapter is not None:
            raise ValueError(f"{path} is a LoRA fine-tuning checkpoint (adapters included); apply --adapter to "
                             f"its base {hp.get('init_from')} instead")
        wrapped = apply_lora(model, LoraSettings.from_dict(hp["lora"]))
        wrapped.load_state_dict(state)
        model = wrapped.merge_and_unload()
    else:
        model.load_state_dict(state)
    model.to(map_location).eval().requires_grad_(False)
    if adapter is not None:
        from ddpm.lora import load_adapter

        model = load_adapter(model, adapter, network=hp["network"], merge=merge_adapter)
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
        "adapter": str(adapter) if adapter is not None else None,
    }
    return LoadedBiFlowNet(
        model=model,
        diffusion=Diffusion(**hp["diffusion"]),
        latent_mean=sd["latent_mean"],
        latent_std=sd["latent_std"],
        conditioning=conditioning,
        hparams=dict(hp),
        geometry=model.xray.geometry if model.xray is not None else None,
    )


def read_network_config(ckpt_path: str | Path) -> dict:
    """BiFlowNet keyword arguments stored in a checkpoint (memory-mapped read, weights untouched).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a BiFlowNet checkpoint.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: BiFlowNet checkpoint not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not isinstance(hp, dict) or not isinstance(hp.get("network"), dict):
        raise ValueError(f"{path}: not a BiFlowNet checkpoint (no network hyper-parameters)")
    return dict(hp["network"])


__all__ = ["LoadedBiFlowNet", "load_biflownet", "read_network_config"]
