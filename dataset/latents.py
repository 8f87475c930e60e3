"""Autoencoder latents on disk and their statistics: one file format, one statistics type.

A latent file (``latents/<subject_id>.pt``, written by ``train.generate_training_latent``) holds
``{"latent": float32 (C, d, h, w), "autoencoder": fingerprint}``: the latent and the fingerprint of the
autoencoder that made it (:func:`dataset.checkpoint.state_fingerprint` of its weights and config), so a
latent of another autoencoder is recognised instead of silently reused. A bare tensor (older files,
hand-made stand-ins) reads as a latent of unknown origin.

:class:`LatentStats` is what ``latent_stats.json`` holds and what the BiFlowNet checkpoint carries:
per-channel mean / std of the raw training latents (the normalisation diffusion trains on), and which
autoencoder made those latents.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dataset.checkpoint import CheckpointError, load_torch_file
from dataset.io import atomic_save_torch, atomic_write_json

STATS_FILE = "latent_stats.json"
_KNOWN = ("mean", "std", "ae_fingerprint", "ae_checkpoint", "count", "split")


@dataclass(frozen=True)
class LatentStats:
    """Per-channel statistics of raw autoencoder latents; ``normalised = (z - mean) / std``.

    Attributes:
        mean: one value per latent channel (or one for all channels).
        std: one positive value per latent channel (or one for all channels), same length as ``mean``.
        ae_fingerprint: fingerprint of the autoencoder whose latents these are (None: unknown).
        ae_checkpoint: absolute path of that autoencoder's checkpoint (None: unknown).
        count: latent voxels per channel the statistics were computed from.
        split: manifest split they were computed on.
        extra: anything else recorded (``scale_factor``, ``mean_all``, ``latent_channels``, ...).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    ae_fingerprint: str | None = None
    ae_checkpoint: str | None = None
    count: int | None = None
    split: str | None = "train"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        mean, std = _floats(self.mean, "mean"), _floats(self.std, "std")
        if len(mean) != len(std) and 1 not in (len(mean), len(std)):
            raise ValueError(f"latent statistics have {len(mean)} means but {len(std)} stds; expected one per channel")
        if not all(s > 0 for s in std):
            raise ValueError(f"latent statistics std {list(std)} must be positive")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def identity(cls) -> "LatentStats":
        """Mean 0, std 1 (no normalisation)."""
        return cls((0.0,), (1.0,), split=None)

    @property
    def channels(self) -> int:
        """Number of channels the statistics describe (1 = the same values for every channel)."""
        return max(len(self.mean), len(self.std))

    def tensors(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as float32 ``(1, channels, 1, 1, 1)`` tensors (a single value is repeated).

        Raises:
            ValueError: the statistics describe another number of channels.
        """
        out = []
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ValueError(f"latent statistics have {len(values)} {name} values; the latents have {channels} "
                                 "channels (network.in_channels)")
            t = torch.tensor(values, dtype=torch.float32).expand(channels).clone()
            out.append(t.reshape(1, channels, 1, 1, 1))
        return out[0], out[1]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent ``(B, C, d, h, w)`` -> zero-mean, unit-std latent."""
        mean, std = self.tensors(z.shape[1])
        return (z - mean.to(z)) / std.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        mean, std = self.tensors(z.shape[1])
        return z * std.to(z) + mean.to(z)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what ``latent_stats.json`` and checkpoints hold)."""
        d = {"mean": list(self.mean), "std": list(self.std), "ae_fingerprint": self.ae_fingerprint,
             "ae_checkpoint": self.ae_checkpoint, "count": self.count, "split": self.split}
        return {**{k: v for k, v in d.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "latent statistics") -> "LatentStats":
        """Build from a plain dict (JSON file or checkpoint hyper-parameters).

        Raises:
            ValueError: no numeric ``mean`` / ``std``, NaN/Inf, a non-positive std; the message names ``source``.
        """
        if not isinstance(d, dict) or "mean" not in d or "std" not in d:
            raise ValueError(f"{source}: expected 'mean' and 'std' (written by python -m train.generate_training_latent)")
        try:
            return cls(mean=d["mean"], std=d["std"], ae_fingerprint=d.get("ae_fingerprint"),
                       ae_checkpoint=d.get("ae_checkpoint"), count=d.get("count"), split=d.get("split", "train"),
                       extra={k: v for k, v in d.items() if k not in _KNOWN})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatentStats":
        """Read ``latent_stats.json``; a relative ``ae_checkpoint`` is resolved against the file's folder.

        Raises:
            FileNotFoundError: no such file (the message says how to make it).
            ValueError: not JSON, or invalid statistics.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no latent statistics; run `python -m train.generate_training_latent` first")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected the latent statistics of "
                             "python -m train.generate_training_latent") from None
        stats = cls.from_dict(d, str(path))
        if stats.ae_checkpoint:
            stats = replace(stats, ae_checkpoint=str((path.parent / stats.ae_checkpoint).resolve()))
        return stats


def _floats(values: Any, name: str) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if isinstance(values, (int, float)):
        values = [values]
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"latent statistics {name}={values!r} is not a list of numbers") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"latent statistics {name}={list(out)} must be finite numbers (at least one)")
    return out


def write_latent(z: torch.Tensor, path: str | os.PathLike, ae_fingerprint: str) -> None:
    """Save a float32 ``(C, d, h, w)`` latent with the fingerprint of the autoencoder that made it (atomic)."""
    atomic_save_torch({"latent": z.detach().float().cpu().contiguous(), "autoencoder": ae_fingerprint}, path)


def read_latent(path: str | os.PathLike, mmap: bool = False) -> tuple[torch.Tensor, str | None]:
    """Read a latent file: ``(latent (C, d, h, w), autoencoder fingerprint or None when unknown)``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, truncated, unsafe, or not a latent (e.g. a dict without one).
    """
    obj = load_torch_file(path, "latent file (python -m train.generate_training_latent)", mmap=mmap)
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, dict) and isinstance(obj.get("latent"), torch.Tensor):
        fp = obj.get("autoencoder")
        return obj["latent"], fp if isinstance(fp, str) else None
    raise CheckpointError(f"{path}: holds a {type(obj).__name__} without a latent tensor; expected a latent file "
                          "written by python -m train.generate_training_latent")


def check_latent_origin(paths: Sequence[str | os.PathLike], stats: LatentStats, stats_path: str | os.PathLike) -> None:
    """Refuse latents made by another autoencoder than the one ``stats`` names (cheap memory-mapped reads).

    Latents or statistics without a fingerprint (hand-made stand-ins, older files) are not checked.

    Raises:
        FileNotFoundError / CheckpointError: a listed latent is missing or unreadable.
        ValueError: a latent's fingerprint differs from the statistics'.
    """
    if not stats.ae_fingerprint:
        return
    for p in paths:
        _, fp = read_latent(p, mmap=True)
        if fp is not None and fp != stats.ae_fingerprint:
            raise ValueError(f"{p}: latent made by autoencoder {fp[:12]}, but {stats_path} is for autoencoder "
                             f"{stats.ae_fingerprint[:12]} ({stats.ae_checkpoint}); rerun python -m "
                             "train.generate_training_latent to re-encode the stale latents")


__all__ = ["STATS_FILE", "LatentStats", "check_latent_origin", "read_latent", "write_latent"]
