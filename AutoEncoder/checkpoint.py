"""Reading autoencoder checkpoints: ``load_autoencoder`` is what every later stage uses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from AutoEncoder.patch_volume_autoencoder import PatchVolumeAutoencoder


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint as data (``weights_only=True``) and check it has a state dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint with a ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle / zip errors name nothing useful
        raise ValueError(f"{path} is not a readable torch checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def load_autoencoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> PatchVolumeAutoencoder:
    """Rebuild the trained autoencoder from a ``train_PatchVolume`` checkpoint alone.

    Args:
        path: ``.ckpt`` written by :class:`AutoEncoder.patch_volume_module.PatchVolumeModule`.
        map_location: device for the weights.

    Returns:
        A frozen (no gradients) :class:`PatchVolumeAutoencoder` in eval mode, including its codebook and latent
        normalisation buffers (``latent_mean``/``latent_std``; set them with ``set_latent_stats``).
        ``model.dataset_info`` holds the dataset description stored at training time (or ``None``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an autoencoder checkpoint, or the weights do not match the stored configuration.
    """
    ckpt = read_checkpoint(path, map_location)
    hparams = ckpt.get("hyper_parameters") or {}
    config = hparams.get("autoencoder")
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a PatchVolume autoencoder checkpoint (no 'autoencoder' hyper-parameters)")
    model = PatchVolumeAutoencoder(**config)
    state = {k.removeprefix("autoencoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("autoencoder.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the stored autoencoder config: {err}") from None
    model.requires_grad_(False)
    model.eval()
    model.dataset_info = hparams.get("dataset_info")
    return model.to(map_location)
