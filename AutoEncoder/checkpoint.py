"""Reading autoencoder checkpoints: ``load_autoencoder`` is what every later stage uses."""

from __future__ import annotations

import os
from collections.abc import Sequence
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
        normalisation buffers (``latent_mean``/``latent_std``: identity until ``train.generate_training_latent``
        writes the training-latent statistics into the checkpoint with :func:`store_latent_stats`).
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


def store_latent_stats(
    path: str | os.PathLike,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    info: dict[str, Any] | None = None,
) -> None:
    """Write latent statistics into an autoencoder checkpoint, so ``load_autoencoder`` normalises with them.

    The checkpoint is rewritten atomically (temporary file + ``os.replace``; a symlink is followed and its target
    rewritten): the ``autoencoder.latent_mean`` / ``autoencoder.latent_std`` buffers of its state dict get the
    per-channel values (a scalar applies to every channel; ``1 / std`` is latent diffusion's scale factor), and a
    plain-dict ``latent_stats`` entry records them with ``info`` (e.g. where they were computed). Everything else,
    optimiser states included, is kept, so training can still resume from the file.

    Args:
        path: checkpoint written by ``train.train_PatchVolume``.
        mean: per-channel (or one) mean of the raw training latents.
        std: per-channel (or one) standard deviation of the raw training latents, > 0.
        info: extra plain data stored next to the values.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an autoencoder checkpoint, wrong number of values, a non-positive std, or a file that
            cannot be rewritten.
    """
    path = Path(path).resolve()
    ckpt = read_checkpoint(path)
    state = ckpt["state_dict"]
    if "autoencoder.latent_mean" not in state or "autoencoder.latent_std" not in state:
        raise ValueError(f"{path} holds no autoencoder latent statistics buffers (not a PatchVolume checkpoint)")
    channels = state["autoencoder.latent_mean"].numel()
    values = {}
    for name, given in (("mean", mean), ("std", std)):
        t = torch.as_tensor(given, dtype=torch.float32).flatten()
        if t.numel() not in (1, channels) or not torch.isfinite(t).all():
            raise ValueError(f"latent {name} {t.tolist()} must be finite with 1 or {channels} values")
        values[name] = t.expand(channels).clone()
    if not torch.all(values["std"] > 0):
        raise ValueError(f"latent std must be positive, got {values['std'].tolist()}")
    state["autoencoder.latent_mean"] = values["mean"].to(state["autoencoder.latent_mean"])
    state["autoencoder.latent_std"] = values["std"].to(state["autoencoder.latent_std"])
    ckpt["latent_stats"] = {"mean": values["mean"].tolist(), "std": values["std"].tolist(), **dict(info or {})}
    from dataset.io import atomic_save_torch  # lazy: nothing else in AutoEncoder imports the dataset package

    try:
        atomic_save_torch(ckpt, path)
    except OSError as err:
        raise ValueError(f"cannot rewrite {path} with the latent statistics ({err.strerror or err}); make it "
                         "writable or pass --no-store-stats") from None
