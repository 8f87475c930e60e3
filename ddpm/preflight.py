"""Checks run before BiFlowNet training starts, so bad input fails in seconds with a clear message."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dataset.latents import LatentStats, check_latent_origin, read_latent

REGENERATE = "python -m train.generate_training_latent --manifest {manifest} --ae-ckpt <autoencoder.ckpt>"


def read_latent_stats(path: str | os.PathLike) -> LatentStats:
    """Read ``latent_stats.json`` written by ``train.generate_training_latent`` (see :class:`LatentStats`).

    The recorded ``ae_checkpoint`` (resolved to an absolute path) travels into the BiFlowNet checkpoint
    so generation finds its decoder.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not JSON or without valid ``mean`` / ``std``.
    """
    return LatentStats.load(path)


def check_training_inputs(
    manifest: str | os.PathLike,
    latent_channels: int,
    latent_shape: Sequence[int],
    xray_size: Sequence[int] | None,
    stats: LatentStats | None = None,
    stats_path: str | os.PathLike | None = None,
) -> None:
    """Validate a latent manifest against the network configuration and the latent statistics.

    Every listed latent must exist and come from the autoencoder the statistics name (memory-mapped reads);
    the first training row's latent shape and X-ray sizes must fit the network.

    Args:
        manifest: ``manifest.csv`` with a ``latent`` column.
        latent_channels: network ``in_channels``.
        latent_shape: network ``latent_shape`` (D, H, W).
        xray_size: X-ray (H, W) the encoder expects, or None without X-ray conditioning.
        stats: the latent statistics training normalises with (their autoencoder fingerprint is checked).
        stats_path: where ``stats`` came from, for messages.

    Raises:
        FileNotFoundError / ValueError naming the file and what was expected.
    """
    from dataset.manifest import Manifest
    from dataset.radiograph import read_radiograph

    m = Manifest.load(manifest, check_files=False)
    regenerate = REGENERATE.format(manifest=m.path)
    if "latent" not in m.frame.columns:
        raise ValueError(f"{m.path}: manifest has no 'latent' column; encode the CTs first: {regenerate}")
    missing = [p for p in m.frame["latent"] if not p or not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{m.path}: {len(missing)} of {len(m.frame)} latent files are missing (e.g. "
                                f"{missing[0]}); regenerate them: {regenerate}")
    train = m.split("train")
    if len(train) == 0:
        raise ValueError(f"{m.path}: no rows with split 'train'")
    if stats is not None:
        check_latent_origin(list(m.frame["latent"]), stats, stats_path or "the latent statistics")
    row = train.iloc[0]
    z, _ = read_latent(row["latent"], mmap=True)
    expected = (int(latent_channels), *(int(s) for s in latent_shape))
    if tuple(z.shape) != expected:
        raise ValueError(
            f"{row['latent']}: latent has shape {tuple(z.shape)}, but the network config expects {expected} "
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
