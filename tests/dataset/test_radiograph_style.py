"""Radiograph-style augmentation: seeded, in range, identity at zero strength, each part does its job."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dataset import Manifest, PairedDataModule, read_radiograph
from dataset.radiograph_style import IDENTITY, RadiographStyle, StyledXrays, gaussian_blur, sigmoid_lut


def drr_like(size: int = 32) -> torch.Tensor:
    """A smooth blob in air: (1, H, W) in [0, 0.8]."""
    r, c = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return (0.8 * torch.exp(-(r ** 2 / 0.3 + c ** 2 / 0.2))).clamp(0, 1)[None]


def test_same_generator_seed_same_style_and_image() -> None:
    style = RadiographStyle(p=1.0, p_each=1.0)
    x = drr_like()
    a = style(x, torch.Generator().manual_seed(5))
    b = style(x, torch.Generator().manual_seed(5))
    c = style(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_output_stays_in_unit_range_with_extreme_settings() -> None:
    style = RadiographStyle(p=1.0, p_each=1.0, noise_std=(0.2, 0.3), gain=(2.0, 3.0), offset=(0.2, 0.3),
                            unsharp_amount=(3.0, 4.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        y = style(drr_like(), g)
        assert y.shape == (1, 32, 32) and float(y.min()) >= 0.0 and float(y.max()) <= 1.0 and torch.isfinite(y).all()


def test_zero_strength_and_zero_probability_are_the_identity() -> None:
    x = drr_like()
    g = torch.Generator().manual_seed(0)
    for style in (RadiographStyle(p=1.0, p_each=1.0, strength=0.0), RadiographStyle(p=0.0)):
        for _ in range(5):
            assert torch.equal(style(x, g), x)
    assert torch.equal(RadiographStyle.apply(x, IDENTITY), x)


def test_strength_scales_the_drawn_parameters_towards_the_identity() -> None:
    full, half = RadiographStyle(p=1.0, p_each=1.0), RadiographStyle(p=1.0, p_each=1.0, strength=0.5)
    a, b = full.sample(torch.Generator().manual_seed(3)), half.sample(torch.Generator().manual_seed(3))
    assert b["gain"] - 1.0 == pytest.approx(0.5 * (a["gain"] - 1.0))
    assert math.log(b["gamma"]) == pytest.approx(0.5 * math.log(a["gamma"]))


def test_each_part_changes_the_image_as_expected() -> None:
    x = drr_like()
    apply = RadiographStyle.apply
    assert torch.allclose(apply(x, {"gamma": 2.0}), x ** 2, atol=1e-6)
    assert torch.allclose(apply(x, {"gain": 1.1, "offset": 0.05}), (x * 1.1 + 0.05).clamp(0, 1), atol=1e-6)
    blurred = apply(x, {"blur_sigma": 1.5})
    assert float(blurred.max()) < float(x.max()) and abs(float(blurred.mean() - x.mean())) < 1e-2
    sharpened = apply(x, {"unsharp_amount": 1.0, "unsharp_sigma": 0.1})
    assert float((sharpened - x).abs().max()) > 0.01 and float((sharpened - x).mean().abs()) < 0.02
    noisy = apply(x, {"noise_std": 0.02, "noise_seed": 1})
    assert 0.01 < float((noisy - x).std()) < 0.03
    lut = apply(x, {"lut_centre": 0.4, "lut_width": 0.1})
    assert bool((lut[x > 0.6] > x[x > 0.6]).all())  # highs lifted by the window
    assert float(apply(torch.zeros(1, 4, 4), {"lut_centre": 0.4, "lut_width": 0.1}).abs().max()) == 0.0  # air stays


def test_blur_and_lut_helpers() -> None:
    x = torch.zeros(1, 9, 9)
    x[0, 4, 4] = 1.0
    y = gaussian_blur(x, 1.0)
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-5) and torch.equal(y, y.flip(-1))
    v = torch.linspace(0, 1, 11)
    out = sigmoid_lut(v, 0.5, 0.2)
    assert float(out[0]) == pytest.approx(0.0) and float(out[-1]) == pytest.approx(1.0)
    assert bool((out[1:] > out[:-1]).all())


@pytest.mark.parametrize("bad", [{"p": 1.5}, {"strength": float("nan")}, {"gamma": (2.0, 1.0)}, {"gain": (0.0, 1.0)}])
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="is invalid"):
        RadiographStyle(**bad)


def test_config_mapping_and_unknown_keys() -> None:
    assert RadiographStyle.from_config(None) is None
    assert RadiographStyle.from_config({"enabled": False, "p": 0.3}) is None
    assert RadiographStyle.from_config({"p": 0.3}).p == 0.3
    with pytest.raises(ValueError, match="unknown settings \\['gama'\\]"):
        RadiographStyle.from_config({"gama": [1, 2]})


def test_datamodule_restyles_the_training_split_only(tiny_prepared_dataset: Path) -> None:
    dm = PairedDataModule(tiny_prepared_dataset, batch_size=1, load=("ap", "lat"),
                          xray_augment={"p": 1.0, "p_each": 1.0})
    dm.setup("fit")
    assert isinstance(dm.datasets["train"], StyledXrays)
    frame = Manifest.load(tiny_prepared_dataset).frame.set_index("subject_id")
    torch.manual_seed(0)
    train = dm.datasets["train"][0]
    stored = read_radiograph(frame.loc[train["subject_id"], "ap"]).image
    assert train["ap"].shape == stored.shape and not torch.equal(train["ap"], stored)
    val = dm.datasets["val"][0]
    assert torch.equal(val["ap"], read_radiograph(frame.loc[val["subject_id"], "ap"]).image)
