"""Hounsfield units <-> the [-1, 1] range the networks see (the only place this mapping lives)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HUWindow:
    """A clipping window in Hounsfield units, mapped linearly onto [-1, 1].

    ``hu_min`` maps to -1 and ``hu_max`` to +1. The mapping works on tensors of any shape and keeps
    their layout; values outside the window are clipped first, so ``to_hu(to_unit(x))`` equals
    ``clip(x)`` (exactly, after rounding, for integer HU).

    Args:
        hu_min: lower end of the window in HU (default -1000, air).
        hu_max: upper end of the window in HU (default 1000, dense bone).
    """

    hu_min: float = -1000.0
    hu_max: float = 1000.0

    def __post_init__(self) -> None:
        lo, hi = float(self.hu_min), float(self.hu_max)
        if not (torch.isfinite(torch.tensor([lo, hi])).all() and hi > lo):
            raise ValueError(f"HU window [{lo}, {hi}] is invalid; expected finite hu_min < hu_max")
        object.__setattr__(self, "hu_min", lo)
        object.__setattr__(self, "hu_max", hi)

    @property
    def width(self) -> float:
        """Window width in HU."""
        return self.hu_max - self.hu_min

    def clip(self, hu: torch.Tensor) -> torch.Tensor:
        """Clip HU to the window (float32 out)."""
        return hu.to(torch.float32).clamp(self.hu_min, self.hu_max)

    def to_unit(self, hu: torch.Tensor) -> torch.Tensor:
        """Map HU (any shape) to float32 in [-1, 1], clipping to the window first."""
        # float64 inside so integer HU come back exactly after rounding even for wide windows
        x = (hu.to(torch.float64).clamp(self.hu_min, self.hu_max) - self.hu_min) / self.width
        return (2.0 * x - 1.0).to(torch.float32)

    def to_hu(self, unit: torch.Tensor) -> torch.Tensor:
        """Map values in [-1, 1] (any shape; clamped) back to float32 HU inside the window."""
        x = (unit.to(torch.float64).clamp(-1.0, 1.0) + 1.0) / 2.0
        return (x * self.width + self.hu_min).to(torch.float32)

    def to_dict(self) -> dict[str, float]:
        """Plain dict for dataset.json and checkpoints."""
        return {"hu_min": self.hu_min, "hu_max": self.hu_max}

    @classmethod
    def from_dict(cls, d: dict) -> "HUWindow":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(float(d["hu_min"]), float(d["hu_max"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"HU window {d!r} is invalid; expected a mapping with hu_min and hu_max") from e
