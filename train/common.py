"""What both training entry points share: threads, instantiation, resuming safely, checkpoint IO and feedback.

- :func:`configure_threads`: the ``threads`` config option (``torch.set_num_threads``).
- :func:`instantiate`: Hydra instantiation whose bad-input errors stay bad input (exit 2, one line).
- :func:`resolve_ckpt_path` + :func:`check_resume`: resume only a run of the same data, network and stage.
- :func:`check_run_config` (+ :func:`config_int`, :func:`check_optimizer`, :func:`check_run_name`,
  :func:`check_max_steps`): the settings both entry points share, refused in one line before anything is written.
- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file and renamed, so a killed
  write never replaces the last good checkpoint; one with non-finite weights is never written.
- :class:`FiniteWeights`: stops a run whose weights became NaN/Inf instead of checkpointing them, naming the
  step and the last good checkpoint (exit code 3); :func:`check_finite_checkpoint` refuses such a file as input.
- :class:`RunState`: records what a run trained on and its random-number state in each checkpoint, so a
  resumed run continues exactly like an uninterrupted one (from a checkpoint at an epoch end).
- :class:`ProgressReport`: one line per validation with its metrics and, at the end, where checkpoints went.
- :class:`RunConfigWriter`: the run's ``config.yaml``, written once training has started.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig

from dataset.cli import BAD_INPUT, EXIT_NONFINITE, check_range
from dataset.checkpoint import nonfinite_tensors, read_checkpoint
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


# ------------------------------------------------------------------------------------------ config checks
def config_int(value: Any, name: str, min: int | None = None, max: int | None = None, hint: str = "") -> int:
    """``value`` as an int if it is a whole number (not a bool, not 2.5) within ``[min, max]``, else a ``ValueError``
    naming ``name`` and what was expected (``hint`` is added to the message)."""
    bounds = (f" in [{min}, {max}]" if min is not None and max is not None else f" >= {min}" if min is not None
              else f" <= {max}" if max is not None else "")
    expected = f"expected an integer{bounds}{hint}"
    number = value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = int(value.strip())
    if isinstance(number, bool) or not isinstance(number, int):
        raise ValueError(f"{name}={value!r} is not an integer; {expected}")
    if (min is not None and number < min) or (max is not None and number > max):
        raise ValueError(f"{name}={value!r} is out of range; {expected}")
    return number


def check_optimizer(node: Any, name: str = "optimizer") -> None:
    """Refuse optimiser settings torch would accept but train nothing with, or refuse only mid-run: ``lr`` finite,
    > 0 and a float32, ``betas`` two numbers in [0, 1), ``eps`` finite and > 0, ``weight_decay`` / ``momentum``
    finite and >= 0."""
    if node is None:
        return
    if "lr" in node:  # at most float32's largest: torch multiplies float32 weights by it
        check_range(node.get("lr"), f"{name}.lr", min=0, min_open=True, max=float(torch.finfo(torch.float32).max))
    if "betas" in node:
        betas = node.get("betas")
        if isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"{name}.betas={_plain(betas)!r} is invalid; expected two numbers in [0, 1), "
                             "e.g. [0.9, 0.99]")
        for i, beta in enumerate(betas):
            check_range(beta, f"{name}.betas[{i}]", min=0, max=1, max_open=True)
    if "eps" in node:
        check_range(node.get("eps"), f"{name}.eps", min=0, min_open=True)
    for key in ("weight_decay", "momentum"):
        if key in node:
            check_range(node.get(key), f"{name}.{key}", min=0)


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def check_run_name(value: Any) -> str:
    """A ``run_name`` is one folder name under ``paths.log_dir/<task>``: no path separator, no ``..``, not empty."""
    name = "" if value is None else str(value)
    separators = {"/", "\\", os.sep, os.altsep or "/"}
    if not name.strip() or name in (".", "..") or ".." in name or any(c in name for c in separators) or "\0" in name:
        raise ValueError(f"run_name={value!r} is invalid; expected a plain folder name (no '/', '\\' or '..'): the run "
                         "folder is paths.log_dir/<task>/<run_name> (set paths.output_dir=... for another place)")
    return name


def check_max_steps(trainer_cfg: Any) -> int:
    """``trainer.max_steps`` counts optimiser steps: an integer >= 1 (or -1, unlimited, with ``max_epochs`` >= 1)."""
    max_steps = trainer_cfg.get("max_steps", -1)
    max_epochs = trainer_cfg.get("max_epochs", None)
    if max_steps == -1 and not isinstance(max_steps, bool) and isinstance(max_epochs, int) \
            and not isinstance(max_epochs, bool) and max_epochs >= 1:
        return -1
    return config_int(max_steps, "trainer.max_steps", min=1,
                      hint=" (optimiser steps to train; -1 only with trainer.max_epochs >= 1)")


def check_run_config(cfg: DictConfig) -> None:
    """The settings both entry points share, checked before anything is written (one line naming the key, exit 2):
    ``run_name``, ``seed``, ``optimizer.*`` and ``trainer.max_steps``."""
    check_run_name(cfg.get("run_name"))
    config_int(cfg.get("seed"), "seed", min=0, max=2**32 - 1)
    check_optimizer(cfg.get("optimizer"))
    check_max_steps(cfg.trainer)


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
    """Refuse to resume from a checkpoint of another dataset, network or stage, or one with NaN/Inf weights (one line,
    exit code 2).

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
        ValueError: its weights or optimiser state hold NaN/Inf.
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
    for key in ("train_hash", "dataset_json_hash", "latent_autoencoder") if old_id else ():  # older: none recorded
        if old_id.get(key) != identity.get(key):
            what = {"train_hash": "training subjects", "dataset_json_hash": "dataset.json",
                    "latent_autoencoder": "latents (another autoencoder)"}[key]
            raise ResumeMismatch(
                f"{ckpt_path}: cannot resume: it was trained on {old_id.get('manifest')} "
                f"({old_id.get('train_subjects')} training subjects), this run reads {identity.get('manifest')} "
                f"({identity.get('train_subjects')}), and the {what} differ", advice)
    check_finite_checkpoint(ckpt, f"{ckpt_path}: cannot resume",
                            "resume from an earlier checkpoint (ckpt_path=<file>) or start fresh with ckpt_path=null")


# settings that change how a network runs (memory, speed), not what it computes: they may change on resume
RUNTIME_KEYS = ("grad_checkpointing", "encode_chunk_size", "decode_window", "decode_overlap", "decode_halo")


# ------------------------------------------------------------------------------------ checkpoint writes
class NonFiniteWeightsError(RuntimeError):
    """The weights (or EMA weights, or optimiser state) became NaN/Inf: the run stops without checkpointing them and
    the last good checkpoint stays (exit code 3, like a non-finite loss)."""

    exit_code = EXIT_NONFINITE


#: the parts of a Lightning checkpoint that hold weights: the module's state (EMA copy included) and the optimisers'
WEIGHT_KEYS = ("state_dict", "optimizer_states")


def describe_tensors(names: list[str]) -> str:
    """``a.weight`` / ``a.weight and 3 more tensors``."""
    return names[0] + (f" and {len(names) - 1} more tensor{'s' if len(names) > 2 else ''}" if len(names) > 1 else "")


def check_finite_checkpoint(checkpoint: Mapping, what: str, advice: str, keys: tuple[str, ...] = WEIGHT_KEYS) -> None:
    """Refuse a checkpoint read as input whose weights hold NaN/Inf (``ValueError``: ``what: ...; advice``)."""
    bad = nonfinite_tensors(checkpoint, keys)
    if bad:
        raise ValueError(f"{what}: its weights hold non-finite values (NaN/Inf) in {describe_tensors(bad)}; {advice}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file in the same folder, fsyncs and renames.

    Lightning's own writer serialises in memory and then writes (or, with fsspec, moves from ``/tmp``,
    a copy across file systems) onto the target, so a process killed at the wrong moment can leave a
    half-written ``last.ckpt``. Here the target is replaced only by a complete file (``os.replace``).
    A checkpoint whose weights hold NaN/Inf is never written (:class:`FiniteWeights` stops the run before it
    comes to that on every rank; this is the last line for writes that bypass it). ``written`` maps each checkpoint
    this IO wrote (and has not removed) to its ``global_step``; :meth:`latest` is the newest.
    """

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, int] = {}

    def latest(self) -> tuple[str, int] | None:
        """``(path, step)`` of the newest checkpoint written (``last.ckpt`` among those of that step), or None."""
        present = {p: step for p, step in self.written.items() if Path(p).is_file()}
        if not present:
            return None
        path = max(present, key=lambda p: (present[p], Path(p).name == "last.ckpt"))
        return path, present[path]

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        self.written.pop(str(Path(path)), None)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        bad = nonfinite_tensors(checkpoint, WEIGHT_KEYS)
        if bad:
            raise NonFiniteWeightsError(f"{path}: not written: its weights hold non-finite values (NaN/Inf) in "
                                        f"{describe_tensors(bad)} at step {checkpoint.get('global_step')}")
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
            with contextlib.suppress(OSError):
                stale.unlink()
        with atomic_write(path, "wb") as f:  # temporary file, fsync, os.replace
            torch.save(checkpoint, f)
        self.written.pop(str(path), None)  # re-inserted last: the newest of equal steps
        self.written[str(path)] = int(checkpoint.get("global_step", -1))


def _latest_written(trainer: L.Trainer) -> tuple[str, int] | None:
    io = trainer.strategy.checkpoint_io
    return io.latest() if isinstance(io, AtomicCheckpointIO) else None


class FiniteWeights(L.Callback):
    """Stop a run whose weights became NaN/Inf instead of checkpointing them; say when, and what is still good.

    - After every training batch the trainable parameters' norms are folded, on their device and without a host
      sync, into the first step at which one was not finite (``torch._foreach_norm``: one fused reduction).
    - Every checkpoint about to be written (on every rank, in Lightning's ``on_save_checkpoint``) is checked exactly:
      parameters, EMA weights and buffers (``state_dict``) and optimiser state. A non-finite one raises
      :class:`NonFiniteWeightsError` on all ranks (a collective decision) before anything is written, naming the step at
      which the weights became non-finite and the last good checkpoint (the latest written, else the one resumed).
    - Any other error that stops training for a non-finite value (exit code 3, e.g. ``NonFiniteLossError``) gets the
      same facts appended to its message.

    Args:
        resumed_from: the checkpoint this run resumed from (checked finite by :func:`check_resume`), or None.
    """

    #: no non-finite parameter seen yet
    NEVER = 2**62

    def __init__(self, resumed_from: str | None = None) -> None:
        self.resumed_from = resumed_from
        self._first_bad: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        params = [p.detach() for p in pl_module.parameters() if p.requires_grad and p.numel()]
        if not params:
            return
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(params))).all()
        if self._first_bad is None or self._first_bad.device != bad.device:
            self._first_bad = torch.full((), self.NEVER, dtype=torch.long, device=bad.device)
        self._first_bad = torch.where(bad & (self._first_bad == self.NEVER), trainer.global_step, self._first_bad)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        bad = nonfinite_tensors(checkpoint, WEIGHT_KEYS)
        if trainer.strategy.reduce_boolean_decision(not bad, all=True):
            return
        step = int(checkpoint.get("global_step", trainer.global_step))
        first = self._first_bad_step(trainer)
        when = (f"became non-finite (NaN/Inf) at step {first}" if first is not None and first <= step
                else f"are non-finite (NaN/Inf) at step {step}")
        found = f" ({describe_tensors(bad)})" if bad else ""
        raise NonFiniteWeightsError(f"the weights {when}{found}; stopped at step {step} without checkpointing them; "
                                    f"{self._last_good(trainer)}; lower the learning rate (optimizer.lr) or check "
                                    "the data")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if getattr(exception, "exit_code", None) != EXIT_NONFINITE or isinstance(exception, NonFiniteWeightsError):
            return
        first = self._first_bad_step(trainer)
        note = f"the weights became non-finite at step {first}; " if first is not None else ""
        exception.args = (f"{exception}; {note}{self._last_good(trainer)}", *exception.args[1:])

    def _first_bad_step(self, trainer: L.Trainer) -> int | None:
        if self._first_bad is None:
            return None
        first = int(trainer.strategy.reduce(self._first_bad.clone(), reduce_op="min"))
        return None if first >= self.NEVER else first

    def _last_good(self, trainer: L.Trainer) -> str:
        written = _latest_written(trainer)
        written = trainer.strategy.broadcast(written, src=0)  # only rank 0 writes
        if written is not None:
            return f"the last good checkpoint is {written[0]} (step {written[1]})"
        if self.resumed_from:
            return f"this run wrote no checkpoint; the last good one is {self.resumed_from}, which it resumed from"
        return "this run wrote no checkpoint"


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
    """One stdout line per validation (step, metrics, seconds per step) and, once training ended, the checkpoint.

    The final line is printed at ``teardown``, after every callback's ``on_train_end`` (Lightning runs ModelCheckpoint,
    which may write ``last.ckpt`` there, after the other callbacks), and only when training ended without an error.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self._t0: float | None = None
        self._step0 = 0
        self._ended = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self._t0, self._step0, self._ended = time.perf_counter(), trainer.global_step, False

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
        self._ended = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._ended or not trainer.is_global_zero:
            return
        self._ended = False
        written = _latest_written(trainer)
        last = self.checkpoint_dir / "last.ckpt"
        if last.is_file():
            where = str(last)
        elif written is not None:
            where = written[0]
        else:
            where = f"{self.checkpoint_dir} (no checkpoint written)"
        print(f"finished at step {trainer.global_step}; checkpoint: {where}", flush=True)


class RunConfigWriter(L.Callback):
    """Writes the run's ``config.yaml`` (:func:`save_run_config`, rank zero) when training starts: after the module,
    its optimisers and the data were set up, so a run refused before then leaves no config claiming it ran."""

    def __init__(self, cfg: DictConfig, output_dir: str | os.PathLike) -> None:
        self.cfg = cfg
        self.output_dir = output_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_run_config(self.cfg, self.output_dir)


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

