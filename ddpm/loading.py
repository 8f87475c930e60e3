"""Rebuild a trained BiFlowNet (EMA weights) and its diffusion settings from a checkpoint alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataset.checkpoint import CheckpointError, check_finite_state, load_state, read_checkpoint
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
        CheckpointError: not a checkpoint, truncated, unsafe, of another kind, or incompatible weights.
        ValueError: the adapter does not fit it.
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path, "biflownet", map_location)
    hp = ckpt["hyper_parameters"]
    prefix = "ema_model." if use_ema else "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: incompatible: no '{prefix}*' weights in the checkpoint")
    if "latent_mean" not in ckpt["state_dict"] or "latent_std" not in ckpt["state_dict"]:
        raise CheckpointError(f"{path}: incompatible: no latent statistics (latent_mean/latent_std) in the checkpoint")
    try:
        model = BiFlowNet(**hp["network"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: incompatible: its network hyper-parameters are invalid here ({err})") from None
    if hp.get("lora"):
        from ddpm.lora import LoraSettings, apply_lora

        if adapter is not None:
            raise ValueError(f"{path} is a LoRA fine-tuning checkpoint (adapters included); apply --adapter to "
                             f"its base {hp.get('init_from')} instead")
        wrapped = apply_lora(model, LoraSettings.from_dict(hp["lora"]))
        check_finite_state(state, path)
        try:
            wrapped.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: incompatible: its LoRA weights do not fit its network "
                                  f"({str(err).strip().splitlines()[0]})") from None
        model = wrapped.merge_and_unload()
    else:
        load_state(model, state, path, "the BiFlowNet its hyper-parameters describe")
    model.to(map_location).eval().requires_grad_(False)
    if adapter is not None:
        from ddpm.lora import load_adapter

        model = load_adapter(model, adapter, network=hp["network"], merge=merge_adapter)
    sd = ckpt["state_dict"]
    stats = {k: sd[k] for k in ("latent_mean", "latent_std")}
    check_finite_state(stats, path)
    expected = (1, model.in_channels, 1, 1, 1)
    for k, v in stats.items():
        if tuple(v.shape) != expected:
            raise CheckpointError(f"{path}: incompatible: {k} has shape {tuple(v.shape)}; expected {expected} (one "
                                  "value per latent channel)")
    if not bool((stats["latent_std"] > 0).all()):
        raise CheckpointError(f"{path}: incompatible: latent_std holds values <= 0; expected positive scales")
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
        CheckpointError: the file is not a BiFlowNet checkpoint (one line).
    """
    return dict(read_checkpoint(ckpt_path, "biflownet", mmap=True)["hyper_parameters"]["network"])


__all__ = ["LoadedBiFlowNet", "load_biflownet", "read_network_config"]
