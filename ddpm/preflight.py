"""Checks run before BiFlowNet training starts, so bad input fails in seconds with a clear message."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch


def read_latent_stats(path: str | os.PathLike) -> dict:
    """Read ``latent_stats.json`` written by ``train.generate_training_latent``.

    Returns:
        {"mean": float | list[float], "std": float | list[float]}, plus "ae_checkpoint" (absolute
        path of the autoencoder that made the latents) when the file records it; it travels into the
        BiFlowNet checkpoint so generation finds its decoder.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not JSON or without numeric ``mean`` / ``std``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latent statistics; run `python -m train.generate_training_latent` first")
    try:
        d = json.loads(path.read_text())
        stats = {"mean": d["mean"], "std": d["std"]}
        torch.as_tensor(stats["mean"], dtype=torch.float32)
        torch.as_tensor(stats["std"], dtype=torch.float32)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected JSON with numeric 'mean' and 'std' ({type(e).__name__}: {e})") from e
    if d.get("ae_checkpoint"):
        stats["ae_checkpoint"] = str((path.parent / d["ae_checkpoint"]).resolve())
    return stats


def check_training_inputs(
    manifest: str | os.PathLike,
    latent_channels: int,
    latent_shape: Sequence[int],
    xray_size: Sequence[int] | None,
) -> None:
    """Validate a latent manifest against the network configuration (first training row).

    Args:
        manifest: ``manifest.csv`` with a ``latent`` column.
        latent_channels: network ``in_channels``.
        latent_shape: network ``latent_shape`` (D, H, W).
        xray_size: X-ray (H, W) the encoder expects, or None without X-ray conditioning.

    Raises:
        FileNotFoundError / ValueError naming the file and what was expected.
    """
    from dataset.manifest import Manifest
    from dataset.radiograph import read_radiograph

    m = Manifest.load(manifest)
    if "latent" not in m.frame.columns:
        raise ValueError(
            f"{m.path}: manifest has no 'latent' column; run `python -m train.generate_training_latent` "
            "to encode the CTs and add it"
        )
    train = m.split("train")
    if len(train) == 0:
        raise ValueError(f"{m.path}: no rows with split 'train'")
    row = train.iloc[0]
    path = Path(row["latent"])
    try:
        z = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: latent file listed in {m.path} does not exist") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a latent tensor ({type(e).__name__}: {e})") from e
    expected = (int(latent_channels), *(int(s) for s in latent_shape))
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != expected:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(
            f"{path}: latent has shape {got}, but the network config expects {expected} "
            "(network.in_channels, network.latent_shape)"
        )
    if xray_size is not None:
        for view in ("ap", "lat"):
            x = read_radiograph(row[view]).image
            if tuple(x.shape[1:]) != tuple(int(s) for s in xray_size):
                raise ValueError(
                    f"{row[view]}: {view.upper()} X-ray is {tuple(x.shape[1:])}, but network.xray.image_size is "
                    f"{tuple(xray_size)}"
                )


__all__ = ["check_training_inputs", "read_latent_stats"]
