"""The one reader of ``.ckpt`` / ``.pt`` files: every failure becomes one line that says what is wrong.

Checkpoints and tensor files are data, never code: everything is read with
``torch.load(..., weights_only=True)``, so a pickle that would run code is refused, not executed.
:func:`load_torch_file` reads any tensor file (latents, ``.pt`` X-rays and CTs);
:func:`read_checkpoint` reads a Lightning checkpoint and checks which kind it is
(:data:`CHECKPOINT_KINDS`): an autoencoder (``train.train_PatchVolume``) or a BiFlowNet
(``train.train_BiFlowNet``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

#: What :func:`checkpoint_kind` can tell apart, and the entry point that writes each.
CHECKPOINT_KINDS = {"autoencoder": "python -m train.train_PatchVolume", "biflownet": "python -m train.train_BiFlowNet"}
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint or tensor file asked for (one-line message)."""


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _describe_load_error(path: Path, err: BaseException, what: str) -> str:
    text = str(err)
    if "GLOBAL" in text or "Unsupported global" in text:
        return (f"{path}: refused: it holds Python objects other than tensors and plain data (unsafe content; "
                f"{_a(what)} is data, never code)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        return f"{path}: truncated or damaged (an incomplete torch file); expected a complete {what}"
    return f"{path}: not a checkpoint or torch file ({type(err).__name__} while reading); expected {_a(what)}"


def load_torch_file(path: str | os.PathLike, what: str = "torch tensor file",
                    map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. ``"latent file"``).
        map_location: device for the tensors.
        mmap: memory-map the tensors instead of reading them (cheap header reads).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a folder, an empty file, not a torch file, truncated, or unsafe content.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; expected {_a(what)}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected {_a(what)}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: is empty; expected {_a(what)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, KeyError ... for bad files
        if mmap and "mmap" in str(err):  # legacy (non-zip) format cannot be memory-mapped
            return load_torch_file(path, what, map_location, mmap=False)
        raise CheckpointError(_describe_load_error(path, err, what)) from None


def checkpoint_kind(ckpt: Any) -> str | None:
    """``"autoencoder"``, ``"biflownet"`` or None for a loaded checkpoint dict."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        return None
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict):
        return None
    if isinstance(hp.get("autoencoder"), dict):
        return "autoencoder"
    if isinstance(hp.get("network"), dict) and isinstance(hp.get("diffusion"), dict):
        return "biflownet"
    return None


def read_checkpoint(path: str | os.PathLike, kind: str | None = None, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Read a Lightning checkpoint of this project and check its kind.

    Args:
        path: ``.ckpt`` file.
        kind: ``"autoencoder"``, ``"biflownet"`` or None (any of them).
        map_location: device for the tensors.
        mmap: memory-map the tensors (when only the hyper-parameters are needed).

    Returns:
        The checkpoint dict (``state_dict``, ``hyper_parameters``, ...).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable (see :func:`load_torch_file`), not a checkpoint of this project,
            or of another kind than asked for; the message names the file and what was expected.
    """
    if kind is not None and kind not in CHECKPOINT_KINDS:
        raise ValueError(f"kind={kind!r} is invalid; expected one of {tuple(CHECKPOINT_KINDS)}")
    wanted = f"{kind} checkpoint ({CHECKPOINT_KINDS[kind]})" if kind else "checkpoint"
    ckpt = load_torch_file(path, wanted, map_location, mmap)
    found = checkpoint_kind(ckpt)
    if found is None:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no state_dict with autoencoder or "
                              f"BiFlowNet hyper-parameters); expected {_a(wanted)}")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path}: is {_a(found)} checkpoint; expected {_a(wanted)}")
    return ckpt


__all__ = ["CHECKPOINT_KINDS", "CheckpointError", "checkpoint_kind", "load_torch_file", "read_checkpoint"]
