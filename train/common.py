"""What both training entry points share: threads, instantiation, resuming safely, checkpoint IO and feedback.

- :func:`configure_threads`: the ``threads`` config option (``torch.set_num_threads``).
- :func:`instantiate`: Hydra instantiation whose bad-input errors stay bad input (exit 2, one line).
- :func:`resolve_ckpt_path` + :func:`check_resume`: resume only a run of the same data, network and stage.
- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file and renamed, so a killed
  write never replaces the last good checkpoint.
- :class:`RunState`: records what a run trained on and its random-number state in each checkpoint, so a
  resumed run continues exactly like an uninterrupted one (from a checkpoint at an epoch end).
- :class:`ProgressReport`: one line per validation with its metrics and, at the end, where checkpoints went.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig

from dataset.cli import BAD_INPUT
from dataset.checkpoint import read_checkpoint
from dataset.io import atomic_write


# ----------------------------------------------------------------------------------------------- threads
#: torch's own intra-op thread count, read before any run changes it
_DEFAULT_THREADS = torch.get_num_threads()


def configure_threads(threads: int | str | None) -> int:
    """Apply the ``threads`` option: ``auto``/None (torch's default share per local process) or a positive int.

    ``auto`` gives each of the node's processes (``LOCAL_WORLD_SIZE``) an equal share of the threads torch
    would use on its own (its default: the physical cores, or ``OMP_NUM_THREADS``), at least 1. On a busy
    shared machine ``threads=1`` can be several times faster for tiny CPU runs (no OpenMP spin-waiting on
    cores that other jobs hold).

    Returns:
        The number of intra-op threads set.
    """
    if threads is None or threads == "auto":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        n = _DEFAULT_THREADS // max(local, 1)
    else:
        try:
            n = int(threads)
        except (TypeError, ValueError):
            raise ValueError(f"threads={threads!r} is invalid; expected auto or a positive integer") from None
        if n < 1 or n != threads:
            raise ValueError(f"threads={threads!r} is invalid; expected auto or a positive integer")
    n = max(1, n)
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------ instantiate
def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, _convert_="all", **kwargs)``; bad input raised inside stays bad input.

    Hydra wraps every error of the target in ``InstantiationException`` (exit code 1); a ``ValueError`` /
    ``FileNotFoundError`` underneath (a missing MedicalNet file, a bad setting) is re-raised as itself.
    """
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, BAD_INPUT):
            raise cause from None
        raise


def instantiate_group(cfg: DictConfig, group: str) -> list:
    """One object per entry of a config mapping such as ``callbacks`` or ``logger`` (empty when absent)."""
    return [instantiate(c) for c in (cfg.get(group) or {}).values()]


# --------------------------------------------------------------------------------------------- resuming
def resolve_ckpt_path(value: str | None, checkpoint_dir: Path) -> str | None:
    """`last` -> the run's last.ckpt when present; None -> fresh; anything else must be an existing file."""
    if value is None:
        return None
    if value == "last":
        last = checkpoint_dir / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(value).is_file():
        raise FileNotFoundError(f"{value}: ckpt_path does not exist; expected a checkpoint to resume from "
                                "(or ckpt_path=null to start fresh)")
    return str(value)


def data_identity(manifest: str | os.PathLike, extra: dict | None = None) -> dict:
    """What a run trains on: the manifest, a hash of its training subject ids and of its ``dataset.json``."""
    import pandas as pd

    manifest = Path(manifest).resolve()
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    train = sorted(frame.loc[frame.get("split", pd.Series(dtype=str)) == "train", "subject_id"])
    info = manifest.parent / "dataset.json"
    return {
        "manifest": str(manifest),
        "train_subjects": len(train),
        "train_hash": hashlib.sha256("\n".join(train).encode()).hexdigest()[:16],
        "dataset_json_hash": hashlib.sha256(info.read_bytes()).hexdigest()[:16] if info.is_file() else None,
        **(extra or {}),
    }


class ResumeMismatch(ValueError):
    """A checkpoint that belongs to another run (:func:`check_resume`): ``reason`` says why, the message adds the
    entry point's advice (callers with other options, such as the demo, give their own)."""

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(f"{reason}; {advice}")
        self.reason = reason


def check_resume(ckpt_path: str, kind: str, identity: dict, expected: dict[str, Any], run_hint: str,
                 normalize: dict[str, Callable[[dict], dict]] | None = None) -> None:
    """Refuse to resume from a checkpoint of another dataset, network or stage (one line, exit code 2).

    Args:
        ckpt_path: the checkpoint about to be resumed (read as data, memory-mapped).
        kind: ``"autoencoder"`` or ``"biflownet"``.
        identity: :func:`data_identity` of this run (compared with the one the checkpoint recorded).
        expected: hyper-parameters this run would store (e.g. ``{"network": {...}}``, ``{"stage": 2}``),
            compared with the checkpoint's.
        run_hint: the run's ``run_name`` for the message.
        normalize: per key of ``expected``, a function applied to the checkpoint's dict and to this run's before they
            are compared (e.g. fill in options added since the checkpoint was written, drop sampling-only ones).

    Raises:
        CheckpointError: the file is not a checkpoint of ``kind``.
        ResumeMismatch: the checkpoint belongs to another run (a ``ValueError``).
    """
    ckpt = read_checkpoint(ckpt_path, kind, mmap=True)
    hp = ckpt["hyper_parameters"]
    advice = (f"give this run its own run_name=... (now {run_hint}), or start fresh with ckpt_path=null")
    for key, value in expected.items():
        old = hp.get(key)
        if normalize and key in normalize and isinstance(old, dict) and isinstance(value, dict):
            old, value = normalize[key](old), normalize[key](value)
        if isinstance(old, dict) and isinstance(value, dict):
            diff = sorted(k for k in set(old) | set(value) if k not in RUNTIME_KEYS and old.get(k) != value.get(k))
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r} there, {value.get(k)!r} here" for k in diff[:3])
                raise ResumeMismatch(f"{ckpt_path}: cannot resume: its {key} differs from this run's ({shown})", advice)
        elif old != value:
            raise ResumeMismatch(f"{ckpt_path}: cannot resume: it was trained with {key}={old!r}, this run has "
                                 f"{key}={value!r}", advice)
    old_id = ckpt.get(RunState.KEY, {}).get("identity")
    if not old_id:
        return  # an older checkpoint that recorded no data identity
    for key in ("train_hash", "dataset_json_hash", "latent_autoencoder"):
        if old_id.get(key) != identity.get(key):
            what = {"train_hash": "training subjects", "dataset_json_hash": "dataset.json",
                    "latent_autoencoder": "latents (another autoencoder)"}[key]
            raise ResumeMismatch(
                f"{ckpt_path}: cannot resume: it was trained on {old_id.get('manifest')} "
                f"({old_id.get('train_subjects')} training subjects), this run reads {identity.get('manifest')} "
                f"({identity.get('train_subjects')}), and the {what} differ", advice)


# settings that change how a network runs (memory, speed), not what it computes: they may change on resume
RUNTIME_KEYS = ("grad_checkpointing", "encode_chunk_size", "decode_window", "decode_overlap", "decode_halo")


# ------------------------------------------------------------------------------------ checkpoint writes
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file in the same folder, fsyncs and renames.

    Lightning's own writer serialises in memory and then writes (or, with fsspec, moves from ``/tmp``,
    a copy across file systems) onto the target, so a process killed at the wrong moment can leave a
    half-written ``last.ckpt``. Here the target is replaced only by a complete file (``os.replace``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
            with contextlib.suppress(OSError):
                stale.unlink()
        with atomic_write(path, "wb") as f:  # temporary file, fsync, os.replace
            torch.save(checkpoint, f)


# ------------------------------------------------------------------------------------------- run state
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int, *key: object) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's ``random`` from ``seed`` and ``key`` (e.g. a step and rank)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *key))).encode()).digest()
    value = int.from_bytes(digest[:8], "little") % (2**63)
    torch.manual_seed(value)
    np.random.seed(value % (2**32))
    random.seed(value)


class RunState(L.Callback):
    """Make a run's randomness a function of (seed, epoch or step, rank) and record what it trained on.

    The global random streams are reseeded at every epoch start and every training step, and
    validation runs with the training streams set aside, so a run resumed from a checkpoint taken at
    an epoch end draws the same noise and patches as one that was never interrupted (the batch order
    comes from :class:`dataset.samplers.EpochRandomSampler`). Each rank gets its own stream. The data
    identity (:func:`data_identity`) goes into every checkpoint for :func:`check_resume`.

    Args:
        identity: what this run trains on.
        seed: the run's seed.
    """

    KEY = "run_state"

    def __init__(self, identity: dict, seed: int = 0) -> None:
        self.identity = dict(identity)
        self.seed = int(seed)
        self._outside_validation: dict | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reseed(self.seed, "epoch", trainer.current_epoch, trainer.global_rank)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        reseed(self.seed, "step", trainer.global_step, trainer.global_rank)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._outside_validation = _rng_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._outside_validation is not None:
            _set_rng_state(self._outside_validation)
            self._outside_validation = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.KEY] = {"identity": self.identity, "seed": self.seed}


# --------------------------------------------------------------------------------------------- feedback
class ProgressReport(L.Callback):
    """One stdout line per validation (step, metrics, seconds per step) and the checkpoint folder at the end."""

    def __init__(self, checkpoint_dir: str | os.PathLike) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        import time

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        steps = trainer.global_step - self._step0
        rate = f", {(time.perf_counter() - self._t0) / steps:.3g} s/step" if self._t0 and steps > 0 else ""
        text = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        print(f"step {trainer.global_step}: {text}{rate}", flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            last = self.checkpoint_dir / "last.ckpt"
            where = f"{last}" if last.is_file() else f"{self.checkpoint_dir} (no checkpoint written)"
            print(f"finished at step {trainer.global_step}; checkpoint: {where}", flush=True)


def save_run_config(cfg: DictConfig, output_dir: str | os.PathLike) -> Path:
    """Write the resolved run config to ``<output_dir>/config.yaml`` (atomically), once the inputs are checked.

    Hydra's own ``.hydra/`` copy is switched off (``hydra.output_subdir: null``) so that a run refused for bad
    input leaves nothing behind.
    """
    from omegaconf import OmegaConf

    from dataset.io import atomic_write_text

    path = Path(output_dir) / "config.yaml"
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unresolvable optional value: keep the interpolations as written
        text = OmegaConf.to_yaml(cfg)
    atomic_write_text(path, text)
    return path


def build_trainer(trainer_cfg: dict | DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Lightning Trainer of a run, with atomic checkpoint writes (unless a strategy brings its own IO)."""
    plugins = [AtomicCheckpointIO()]
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins)

