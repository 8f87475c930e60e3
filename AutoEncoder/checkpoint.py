"""Reading autoencoder checkpoints: ``load_autoencoder`` is what every later stage uses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from AutoEncoder.patch_volume_autoencoder import PatchVolumeAutoencoder
from dataset.checkpoint import CheckpointError, load_state, read_checkpoint, state_fingerprint

# latent statistics once lived in the autoencoder as buffers; they are in latent_stats.json and the BiFlowNet now
LEGACY_KEYS = ("latent_mean", "latent_std")


@dataclass
class LoadedAutoencoder:
    """A trained autoencoder and what its checkpoint says about it.

    Attributes:
        model: frozen (no gradients) :class:`PatchVolumeAutoencoder` in eval mode.
        config: its keyword arguments (plain dict).
        dataset_info: the prepared dataset's description stored at training time (window, spacing, ...)
            or None.
        path: the checkpoint file.
    """

    model: PatchVolumeAutoencoder
    config: dict
    dataset_info: dict | None
    path: Path
    hparams: dict = field(default_factory=dict)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the weights and config: latents record it to name the autoencoder that made them."""
        return state_fingerprint(self.model.state_dict(), self.config)


def autoencoder_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``autoencoder.*`` weights of a ``train_PatchVolume`` checkpoint under the network's own names."""
    state = {k.removeprefix("autoencoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("autoencoder.")}
    return {k: v for k, v in state.items() if k not in LEGACY_KEYS}


def load_autoencoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedAutoencoder:
    """Rebuild the trained autoencoder from a ``train_PatchVolume`` checkpoint alone.

    Args:
        path: ``.ckpt`` written by :class:`AutoEncoder.patch_volume_module.PatchVolumeModule`.
        map_location: device for the weights.

    Returns:
        :class:`LoadedAutoencoder` (``.model`` is the network, codebook included).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a checkpoint, truncated, unsafe, of another kind, or weights that do not fit
            the stored configuration (a ``ValueError``: one line, exit code 2 in the CLIs).
    """
    path = Path(path)
    ckpt = read_checkpoint(path, "autoencoder", map_location)
    hparams = ckpt["hyper_parameters"]
    config = dict(hparams["autoencoder"])
    try:
        model = PatchVolumeAutoencoder(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: incompatible: its autoencoder hyper-parameters are invalid here ({err})") from None
    load_state(model, autoencoder_state(ckpt), path, "the autoencoder its hyper-parameters describe")
    model.requires_grad_(False)
    model.eval()
    return LoadedAutoencoder(model.to(map_location), config, hparams.get("dataset_info"), path, dict(hparams))


__all__ = ["LEGACY_KEYS", "LoadedAutoencoder", "autoencoder_state", "load_autoencoder"]
