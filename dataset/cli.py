"""The one command-line layer every entry point uses: parsing, number checks, exit codes, library noise.

Exit codes (also in CLAUDE.md):

- 0: done.
- 2: bad input: a bad argument or config value, a missing / corrupt / wrong-kind file, NaN, wrong
  shape. One line on stderr, ``prog: error: ...``, and nothing half-written.
- 3: training stopped by a non-finite loss or non-finite weights (never checkpointed; the last good checkpoint is kept and named).
- 130: interrupted (Ctrl-C), one line, no traceback.
- 1: an internal error (a bug): one line naming the exception; ``XRAY2CT_TRACEBACK=1`` shows the traceback.

Errors carry their own code by an ``exit_code`` class attribute (see
``ddpm.biflownet_module.NonFiniteLossError``); ``ValueError`` / ``FileNotFoundError`` /
``FileExistsError`` / ``NotADirectoryError`` / ``IsADirectoryError`` and Hydra / OmegaConf config errors
(a missing ``???`` value, an unknown key) are bad input.

Hydra entry points end as ``hydra_entry(main, prog)`` around a ``@hydra.main`` function whose body is
``hydra_task(prog, lambda: run(cfg))``: Hydra's own errors (a bad override) become one line and exit 2 too.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
TRACEBACK_ENV = "XRAY2CT_TRACEBACK"
ALLOCATOR_ENV = "XRAY2CT_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_ALLOCATOR: dict[str, bool] = {}


def one_line(err: BaseException | str) -> str:
    """An error message folded onto one line (library messages can span many)."""
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0]


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr (``prog: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)}\n")


def number(kind: type = float, min: float | None = None, max: float | None = None, min_open: bool = False,
           max_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` that parses a finite number within bounds.

    Args:
        kind: ``float`` or ``int``.
        min, max: bounds (None: unbounded).
        min_open, max_open: exclude the bound itself.

    Returns:
        A converter raising ``argparse.ArgumentTypeError`` (-> one line, exit 2) for text that is not a
        number, NaN/Inf, or a value out of range.
    """

    def convert(text: str) -> Any:
        try:
            value = kind(text) if kind is int else float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        check_range(value, "value", min, max, min_open, max_open, error=argparse.ArgumentTypeError)
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def check_range(value: float, name: str, min: float | None = None, max: float | None = None,
                min_open: bool = False, max_open: bool = False, error: type[Exception] = ValueError) -> float:
    """Return ``value`` if finite and within bounds, else raise ``error`` naming ``name`` and the range."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise error(f"{name}={value!r} is not a number") from None
    low_ok = min is None or (v > min if min_open else v >= min)
    high_ok = max is None or (v < max if max_open else v <= max)
    if not math.isfinite(v) or not (low_ok and high_ok):
        lo = "-inf" if min is None else f"{min:g}"
        hi = "inf" if max is None else f"{max:g}"
        interval = f"{'(' if min_open or min is None else '['}{lo}, {hi}{')' if max_open or max is None else ']'}"
        raise error(f"{name}={value!r} is out of range; expected a finite value in {interval}")
    return value


def _is_config_error(err: BaseException) -> bool:
    return any(c.__module__.split(".")[0] in ("omegaconf", "hydra") for c in type(err).__mro__[:-2])


def exit_code_of(err: BaseException) -> int:
    """The exit code an exception maps to (see the module docstring)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(err, BAD_INPUT) or _is_config_error(err):
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def reuse_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel (once per process).

    glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it on ``free``, so each large
    tensor that a CPU forward or backward pass allocates is zero-filled page by page by the kernel on first
    touch. For the 64^3 decoder of the demo's guided sampling that was 40 % of the time (element-wise ops on
    268 MB activations ran at 1.7 GB/s). With ``mmap`` off and no trimming, freed blocks are reused at
    memory speed; the process keeps its high-water mark until it exits, which is its peak anyway.
    ``XRAY2CT_MALLOC=system`` keeps glibc's defaults; other C libraries are left alone.

    Returns:
        True if the setting is in effect (applied now or before).
    """
    if "applied" in _ALLOCATOR:
        return _ALLOCATOR["applied"]
    applied = False
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() != "system":
        import ctypes
        import platform

        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
            except (OSError, AttributeError):
                applied = False
    _ALLOCATOR["applied"] = applied
    return applied


def run_cli(prog: str, fn: Callable[[], int | None], interrupted: str = "") -> int:
    """Run ``fn`` and map what it raises to one stderr line and an exit code (never a traceback).

    Args:
        prog: program name for messages (``python -m package.module``).
        fn: the work; returns an exit code or None (0).
        interrupted: what to add to the Ctrl-C line (e.g. how to resume).

    Returns:
        The exit code.
    """
    note = f"; {interrupted}" if interrupted else ""
    reuse_freed_memory()
    try:
        code = fn()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted{note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # Lightning answers Ctrl-C with sys.exit(1)
            print(f"\n{prog}: interrupted{note}", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    except Exception as err:  # noqa: BLE001 - the one place that turns every error into an exit code
        code = exit_code_of(err)
        if code == EXIT_INTERNAL:
            if os.environ.get(TRACEBACK_ENV):
                traceback.print_exc()
            print(f"{prog}: internal error: {type(err).__name__}: {one_line(err)} "
                  f"(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        else:
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return code
    return EXIT_OK if code is None else int(code)


class TaskExit(SystemExit):
    """The exit of a Hydra task function (its code is final; see :func:`hydra_entry`)."""


_HYDRA: dict[str, Any] = {}


def hydra_task(prog: str, fn: Callable[[], int | None], output_dir: str | os.PathLike | None = None) -> NoReturn:
    """Body of a ``@hydra.main`` function: run ``fn`` through :func:`run_cli` and exit with its code.

    Also hands stderr back to the program (:func:`hydra_entry` holds it while Hydra composes the config).

    Args:
        prog: program name for messages.
        fn: the work.
        output_dir: the run folder Hydra created; removed again when the run fails and wrote no file into it.
    """
    _release_stderr()
    code = run_cli(prog, fn)
    if code != EXIT_OK and output_dir is not None:
        _remove_if_empty(output_dir)
    raise TaskExit(code)


def _remove_if_empty(folder: str | os.PathLike) -> None:
    """Remove ``folder`` (and its sub-folders) if no file lies anywhere inside."""
    import shutil
    from pathlib import Path

    folder = Path(folder)
    if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _release_stderr() -> None:
    held = _HYDRA.pop("held", None)
    if held is not None:
        real, buffer = held
        sys.stderr = real
        sys.stderr.write(buffer.getvalue())


def _fold_hydra_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    return " ".join(lines) or "invalid command line or configuration"


def hydra_entry(main: Callable[[], Any], prog: str = "") -> NoReturn:
    """Call a ``@hydra.main`` function and exit; Hydra's own errors (bad overrides) are one line, exit 2.

    Until the task function starts (:func:`hydra_task`), stderr is held back, so a composition error that
    Hydra prints over several lines becomes ``prog: error: ...`` on one line; Ctrl-C exits 130.
    """
    buffer = io.StringIO()
    _HYDRA["held"] = (sys.stderr, buffer)
    real = sys.stderr
    sys.stderr = buffer
    try:
        main()
    except TaskExit as e:
        sys.exit(e.code)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_INTERNAL)
        held = "held" in _HYDRA
        sys.stderr = real
        _HYDRA.pop("held", None)
        if held and code != EXIT_OK:
            print(f"{prog or 'hydra'}: error: {_fold_hydra_error(buffer.getvalue())}", file=real)
            sys.exit(EXIT_BAD_INPUT)
        if held:
            real.write(buffer.getvalue())
        sys.exit(code)
    except KeyboardInterrupt:
        _release_stderr()
        print(f"\n{prog or 'hydra'}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if sys.stderr is buffer:
            sys.stderr = real
    _release_stderr()
    sys.exit(EXIT_OK)


_NOISY_MESSAGES = (
    r".*does not have many workers.*",
    r".*modules? in eval mode.*",
    r".*module\(s\) in eval mode.*",
    r".*treespec.*",
    r".*litlogger.*",
    r".*litmodels.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*torch.utils._pytree.*",
    r".*`isinstance\(treespec, LeafSpec\)`.*",
    r".*LeafSpec.*",
    r".*Precision bf16-mixed is not supported by the model summary.*",
    r".*You are using a CUDA device.*Tensor Cores.*",
    r".*GPU available but not used.*",
    r".*sync_dist=True.*",
    r".*Using ModelCheckpoint with manual optimization.*",
    r".*Your `IterableDataset` has `__len__` defined.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*lr_scheduler.step\(\)` before `optimizer.step\(\)`.*",
)


def quiet_libraries() -> None:
    """Filter library noise in one place: Lightning tips and info lines, and known harmless warnings.

    Progress bars, our own messages, and real warnings stay. Call it after importing Lightning
    (importing Lightning resets its loggers).
    """
    for message in _NOISY_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|lightning|monai|timm|torchio).*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # optuna logs an interrupted trial as failed, with its traceback: noise after Ctrl-C (run_cli says so)
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _NoInterruptTraceback) for f in handler.filters):
            handler.addFilter(_NoInterruptTraceback())


class _NoInterruptTraceback(logging.Filter):
    """Drop log records that report a Ctrl-C with its traceback (the program says it was interrupted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, SystemExit)))


def parse_device(value, option: str = "--device"):
    """The ``torch.device`` a command runs on: ``None`` = CUDA when available, else the CPU; else ``cpu`` or a
    ``cuda[:N]`` that exists.

    Raises:
        ValueError: one line naming ``option``: not a device, another kind, or a CUDA device this machine lacks.
    """
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {value!r} is invalid; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {value!r} is invalid; expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {value!r}: no CUDA device is available here; expected cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{option} {value!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


__all__ = [
    "BAD_INPUT", "EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "EXIT_OK",
    "OneLineParser", "TaskExit", "check_range", "exit_code_of", "hydra_entry", "hydra_task", "number", "one_line", "parse_device", "quiet_libraries",
    "run_cli",
]
