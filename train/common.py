"""What both training entry points share: resuming and building callbacks and loggers from the config."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig


def resolve_ckpt_path(value: str | None, checkpoint_dir: Path) -> str | None:
    """`last` -> the run's last.ckpt when present; None -> fresh; anything else must be an existing file."""
    if value is None:
        return None
    if value == "last":
        last = checkpoint_dir / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(value).is_file():
        raise FileNotFoundError(f"{value}: ckpt_path does not exist; expected a checkpoint to resume from")
    return str(value)


def instantiate_group(cfg: DictConfig, group: str) -> list:
    """One object per entry of a config mapping such as ``callbacks`` or ``logger`` (empty when absent)."""
    return [hydra.utils.instantiate(c, _convert_="all") for c in (cfg.get(group) or {}).values()]
