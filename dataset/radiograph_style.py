"""Radiograph-style augmentation of DRRs: the look of a processed clinical radiograph, drawn at random.

A DRR is a fixed physical map of the path length (``dataset.drr``); a hospital radiograph of the same
projection has been through a detector and an image-processing chain. :class:`RadiographStyle`
imitates that chain in the order it happens, each part switched on with probability ``p_each``:

1. detector blur: Gaussian, ``blur_sigma`` pixels;
2. noise: Gaussian, standard deviation ``noise_std`` (fraction of the [0, 1] range);
3. exposure / offset: ``x * gain + offset``;
4. gamma: ``x ** gamma`` (log-uniform);
5. edge enhancement (unsharp mask): ``x + amount * (x - blur(x, sigma))`` with ``sigma`` a fraction
   of the image size;
6. display LUT: a sigmoid window with centre ``lut_centre`` and width ``lut_width``, rescaled so that
   0 and 1 stay 0 and 1;

then the result is clamped to [0, 1]. ``strength`` scales every draw towards the identity
(``strength=0`` returns the input unchanged). Like TorchIO / MONAI random transforms, parameters
are drawn by :meth:`sample` (from a ``torch.Generator`` when given, else torch's global generator,
which Lightning seeds per data-loader worker) and applied by the deterministic :meth:`apply`, so a
fixed style (a benchmark's) is ``apply(x, params)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

#: Parameters of one drawn style and their identity values.
IDENTITY = {"blur_sigma": 0.0, "noise_std": 0.0, "gain": 1.0, "offset": 0.0, "gamma": 1.0, "unsharp_amount": 0.0,
            "unsharp_sigma": 0.05, "lut_centre": 0.5, "lut_width": 0.0}
#: Keys every item carries for the noise draw.
_NOISE_SEED = "noise_seed"


def _range(value: Sequence[float], name: str, low: float | None = None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is invalid; expected a (low, high) pair") from None
    if not (math.isfinite(a) and math.isfinite(b) and a <= b) or (low is not None and a < low):
        bound = "" if low is None else f" with low >= {low:g}"
        raise ValueError(f"{name}={value!r} is invalid; expected finite low <= high{bound}")
    return a, b


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(..., H, W)`` with ``sigma`` pixels (reflect padding); identity for sigma <= 0."""
    if sigma <= 1e-3:
        return x
    h, w = x.shape[-2:]
    radius = max(1, min(int(math.ceil(3 * sigma)), min(h, w) - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    shape = x.shape
    y = x.reshape(-1, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return y.reshape(shape)


def sigmoid_lut(x: torch.Tensor, centre: float, width: float) -> torch.Tensor:
    """A display window: sigmoid around ``centre`` with ``width``, rescaled so 0 -> 0 and 1 -> 1 (identity at width 0)."""
    if width <= 1e-6:
        return x
    s = lambda v: torch.sigmoid((v - centre) / width)  # noqa: E731
    lo, hi = s(torch.zeros((), dtype=x.dtype)), s(torch.ones((), dtype=x.dtype))
    return (s(x) - lo) / (hi - lo)


@dataclass
class RadiographStyle:
    """Random radiograph look for ``(..., H, W)`` X-rays in [0, 1] (see the module docstring).

    Args:
        p: probability that an image is restyled at all.
        p_each: probability of each part once restyled.
        strength: scales every drawn parameter towards the identity, in [0, 1] (0 = off).
        blur_sigma: detector blur range, pixels.
        noise_std: noise standard deviation range.
        gain, offset: exposure ranges.
        gamma: gamma range (drawn log-uniformly).
        unsharp_amount: edge-enhancement amount range.
        unsharp_sigma: edge-enhancement blur range, fraction of the image's shorter side.
        lut_centre, lut_width: display LUT (sigmoid) ranges.
    """

    p: float = 0.8
    p_each: float = 0.5
    strength: float = 1.0
    blur_sigma: tuple[float, float] = (0.0, 1.2)
    noise_std: tuple[float, float] = (0.0, 0.03)
    gain: tuple[float, float] = (0.8, 1.2)
    offset: tuple[float, float] = (-0.05, 0.05)
    gamma: tuple[float, float] = (0.5, 2.0)
    unsharp_amount: tuple[float, float] = (0.0, 2.0)
    unsharp_sigma: tuple[float, float] = (0.02, 0.1)
    lut_centre: tuple[float, float] = (0.3, 0.7)
    lut_width: tuple[float, float] = (0.08, 0.4)

    def __post_init__(self) -> None:
        for name in ("p", "p_each", "strength"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; expected a number in [0, 1]")
            setattr(self, name, v)
        lows = {"blur_sigma": 0.0, "noise_std": 0.0, "gamma": 1e-3, "unsharp_amount": 0.0, "unsharp_sigma": 1e-3,
                "lut_width": 0.0}
        for name in ("blur_sigma", "noise_std", "gain", "offset", "gamma", "unsharp_amount", "unsharp_sigma",
                     "lut_centre", "lut_width"):
            setattr(self, name, _range(getattr(self, name), name, lows.get(name)))
        if self.gain[0] <= 0:
            raise ValueError(f"gain={self.gain!r} is invalid; expected a positive range")

    @classmethod
    def from_config(cls, config: Mapping | "RadiographStyle" | None) -> "RadiographStyle | None":
        """From a data-config mapping (``enabled: false`` or None -> None), or pass an instance through."""
        if config is None or isinstance(config, RadiographStyle):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"xray_augment={config!r} is invalid; expected a mapping of RadiographStyle settings")
        settings = dict(config)
        if not settings.pop("enabled", True):
            return None
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"xray_augment has unknown settings {unknown}; expected some of "
                             f"{sorted(cls.__dataclass_fields__)} (or enabled: false)")
        return cls(**settings)

    def to_dict(self) -> dict:
        """Plain settings (JSON-able)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def sample(self, generator: torch.Generator | None = None) -> dict[str, float]:
        """Draw one style: a dict of :data:`IDENTITY`'s keys (+ a noise seed); the identity when not restyled."""
        u = lambda: float(torch.rand((), generator=generator))  # noqa: E731
        params = dict(IDENTITY)
        params[_NOISE_SEED] = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        if self.strength == 0.0 or u() >= self.p:
            return params
        s = self.strength

        def draw(lo_hi: tuple[float, float], identity: float, log: bool = False) -> float:
            lo, hi = lo_hi
            if log:
                value = math.exp(math.log(lo) + u() * (math.log(hi) - math.log(lo)))
                return math.exp(s * math.log(value) + (1 - s) * math.log(identity))
            return identity + s * (lo + u() * (hi - lo) - identity)

        if u() < self.p_each:
            params["blur_sigma"] = draw(self.blur_sigma, 0.0)
        if u() < self.p_each:
            params["noise_std"] = draw(self.noise_std, 0.0)
        if u() < self.p_each:
            params["gain"] = draw(self.gain, 1.0)
            params["offset"] = draw(self.offset, 0.0)
        if u() < self.p_each:
            params["gamma"] = draw(self.gamma, 1.0, log=True)
        if u() < self.p_each:
            params["unsharp_amount"] = draw(self.unsharp_amount, 0.0)
            params["unsharp_sigma"] = self.unsharp_sigma[0] + u() * (self.unsharp_sigma[1] - self.unsharp_sigma[0])
        if u() < self.p_each:
            params["lut_centre"] = draw(self.lut_centre, 0.5)
            params["lut_width"] = draw(self.lut_width, 0.0)
        return params

    @staticmethod
    def apply(x: torch.Tensor, params: Mapping[str, float]) -> torch.Tensor:
        """Apply one style (from :meth:`sample`, or written by hand with :data:`IDENTITY`'s keys) to ``(..., H, W)``.

        Missing keys take their identity value; the identity style returns ``x`` unchanged.
        """
        p = {**IDENTITY, **params}
        if all(p[k] == v for k, v in IDENTITY.items()):
            return x
        y = x.float()
        y = gaussian_blur(y, p["blur_sigma"])
        if p["noise_std"] > 0:
            g = torch.Generator().manual_seed(int(p.get(_NOISE_SEED, 0)))
            y = y + p["noise_std"] * torch.randn(y.shape, generator=g).to(y)
        y = (y * p["gain"] + p["offset"]).clamp(0.0, 1.0)
        if p["gamma"] != 1.0:
            y = y.clamp_min(0.0) ** p["gamma"]
        if p["unsharp_amount"] > 0:
            sigma = p["unsharp_sigma"] * min(y.shape[-2:])
            y = y + p["unsharp_amount"] * (y - gaussian_blur(y, sigma))
        y = sigmoid_lut(y.clamp(0.0, 1.0), p["lut_centre"], p["lut_width"])
        return y.clamp(0.0, 1.0).to(x.dtype)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A randomly restyled copy of ``x`` ``(..., H, W)`` in [0, 1]."""
        return self.apply(x, self.sample(generator))


class StyledXrays(Dataset):
    """A paired dataset whose ``"ap"`` / ``"lat"`` items get an independent :class:`RadiographStyle` each.

    Args:
        dataset: yields dicts (``dataset.PairedDataset`` or its cache).
        style: the random transform.
        keys: item entries to restyle (those present).
    """

    def __init__(self, dataset: Dataset, style: RadiographStyle, keys: Sequence[str] = ("ap", "lat")) -> None:
        self.dataset, self.style, self.keys = dataset, style, tuple(keys)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        for key in self.keys:
            if key in item:
                item[key] = self.style(item[key])
        return item


__all__ = ["IDENTITY", "RadiographStyle", "StyledXrays", "gaussian_blur", "sigmoid_lut"]
