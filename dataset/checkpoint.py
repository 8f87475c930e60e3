"""The one reader of ``.ckpt`` / ``.pt`` files: every failure becomes one line that says what is wrong.

Checkpoints and tensor files are data, never code: everything is read with
``torch.load(..., weights_only=True)``, so a pickle that would run code is refused, not executed.
:func:`load_torch_file` reads any tensor file (latents, ``.pt`` X-rays and CTs);
:func:`read_checkpoint` reads a Lightning checkpoint and checks which kind it is
(:data:`CHECKPOINT_KINDS`): an autoencoder (``train.train_PatchVolume``) or a BiFlowNet
(``train.train_BiFlowNet``). LoRA adapters are folders (:func:`check_adapter_dir`) whose weights are
safetensors (:func:`read_safetensors`). :func:`load_state` loads weights into a network with a one-line
"incompatible" error, and :func:`state_fingerprint` identifies a network by its weights and config.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: What :func:`checkpoint_kind` can tell apart, and the entry point that writes each.
CHECKPOINT_KINDS = {"autoencoder": "python -m train.train_PatchVolume", "biflownet": "python -m train.train_BiFlowNet"}
_ZIP_MAGIC = b"PK\x03\x04"
ADAPTER_MARKER = "biflownet_adapter.json"  # the file that makes a folder a LoRA adapter (ddpm.lora)
ADAPTER_WHAT = "LoRA adapter folder (<run>/adapter of experiment=biflownet_lora)"


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint or tensor file asked for (one-line message)."""


def _a(noun: str) -> str:
    vowel_sound = noun[:1].lower() in "aeiou" or noun.startswith("X-")
    return f"{'an' if vowel_sound else 'a'} {noun}"


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
        if (path / ADAPTER_MARKER).is_file():
            raise CheckpointError(f"{path}: is a LoRA adapter folder; expected {_a(what)} (pass an adapter with --adapter)")
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


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a LoRA adapter folder (it holds ``biflownet_adapter.json``), naming what it is otherwise.

    Raises:
        FileNotFoundError: no such folder.
        CheckpointError: a checkpoint or other file, or a folder without the adapter files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder; expected {_a(ADAPTER_WHAT)}")
    if path.is_file():
        try:
            kind = checkpoint_kind(load_torch_file(path, "checkpoint", mmap=True))
        except (CheckpointError, OSError):
            kind = None
        found = f"is {_a(kind)} checkpoint" if kind else "is a file"
        raise CheckpointError(f"{path}: {found}; expected {_a(ADAPTER_WHAT)}")
    if not (path / ADAPTER_MARKER).is_file():
        raise CheckpointError(f"{path}: has no {ADAPTER_MARKER}; expected {_a(ADAPTER_WHAT)}")
    return path


def read_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with one-line errors (missing, empty, truncated or not safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {_a(what)}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: is empty; expected {_a(what)}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({one_line_error(err)}); "
                              f"expected {_a(what)}") from None


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line "incompatible" error naming ``path``.

    Raises:
        CheckpointError: missing, unexpected or differently shaped weights, or non-finite ones (a diverged run).
    """
    check_finite_state(state, path)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {name} (e.g. {v[0]})" for name, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
        raise CheckpointError(f"{path}: incompatible: its weights do not fit {what} ({'; '.join(parts)} tensors)")
    module.load_state_dict(dict(state), strict=True)


def _float_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not obj.is_meta and obj.numel():
            yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _float_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _float_tensors(value, f"{prefix}[{i}]")


def nonfinite_tensors(parts: Mapping, keys: Sequence[str] | None = None) -> list[str]:
    """Names of the floating-point tensors (nested in dicts / lists too) under ``keys`` of ``parts`` (all keys when
    None) that hold NaN or Inf; empty when all are finite.

    One reduction per tensor and one host transfer per device, so it is cheap next to writing a checkpoint.
    """
    items = [item for key in (parts if keys is None else keys) if key in parts
             for item in _float_tensors(parts[key], str(key))]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(items):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for index in by_device.values():
        finite = torch.stack([torch.isfinite(items[i][1]).all() for i in index]).cpu()
        if not bool(finite.all()):
            bad += [i for i, ok in zip(index, finite.tolist()) if not ok]
    return [items[i][0] for i in sorted(bad)]


def check_finite_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse weights with NaN or Inf values: a model that diverged produces NaN volumes without complaint.

    Raises:
        CheckpointError: naming ``path``, how many tensors are affected and the first of them.
    """
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{path}: holds non-finite weights ({len(bad)} of {len(state)} tensors, e.g. {bad[0]}); "
                              "expected finite weights: the run that wrote it diverged, use an earlier checkpoint")


def state_fingerprint(state: Mapping[str, torch.Tensor], config: Any = None) -> str:
    """SHA-256 over a JSON-able ``config`` and the names, shapes, dtypes and bytes of ``state``'s tensors.

    Two networks with the same fingerprint compute the same function; one changed weight changes it.
    """
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def one_line_error(err: BaseException) -> str:
    """``Type: first line`` of a library error."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


__all__ = ["ADAPTER_MARKER", "CHECKPOINT_KINDS", "CheckpointError", "check_adapter_dir", "checkpoint_kind",
           "load_state", "load_torch_file", "read_checkpoint", "read_safetensors", "state_fingerprint"]
