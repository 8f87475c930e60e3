"""Intensity harmonisation: monotone distortions of a DRR are mapped back close to the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataset import IntensityReference, Manifest, read_radiograph
from dataset.radiograph_style import RadiographStyle
from dataset.xray_harmonization import LEVELS, body_mask, otsu_threshold


@pytest.fixture(scope="module")
def train_images(tiny_prepared_dataset: Path) -> dict[str, list[torch.Tensor]]:
    frame = Manifest.load(tiny_prepared_dataset).split("train")
    return {view: [read_radiograph(p).image for p in frame[view.lower()]] for view in ("AP", "LAT")}


def test_otsu_splits_two_clusters() -> None:
    low, high = torch.linspace(0.1, 0.11, 100), torch.linspace(0.7, 0.72, 50)
    t = otsu_threshold(torch.cat([low, high]))
    assert float(low.max()) <= t < float(high.min())


def test_body_mask_leaves_out_air_and_invalid_pixels() -> None:
    image = torch.zeros(1, 10, 10)
    image[0, 2:8, 3:7] = 0.6
    valid = torch.ones_like(image, dtype=torch.bool)
    valid[0, :, 6:] = False
    body, _ = body_mask(image, valid)
    expected = torch.zeros_like(body)
    expected[0, 2:8, 3:6] = True
    assert torch.equal(body, expected)


@pytest.mark.parametrize("style", [{"gamma": 0.6}, {"gamma": 1.8}, {"lut_centre": 0.4, "lut_width": 0.15},
                                   {"gain": 0.8, "offset": 0.05, "gamma": 1.3}])
def test_monotone_distortion_of_a_drr_is_undone(train_images, tiny_prepared_dataset: Path, style: dict) -> None:
    reference = IntensityReference.from_images(train_images)
    test = Manifest.load(tiny_prepared_dataset).split("test").iloc[0]
    for view in ("AP", "LAT"):
        clean = read_radiograph(test[view.lower()]).image
        distorted = RadiographStyle.apply(clean, style)
        matched, step = reference.match(distorted, view)
        before = float((distorted - clean).abs().mean())
        after = float((matched - clean).abs().mean())
        assert after < 0.35 * before and after < 0.02, (view, before, after)
        assert step.startswith(f"harmonised {view}")
        # the clean image itself is nearly unchanged (its own quantiles are close to the training mean)
        assert float((reference.match(clean, view)[0] - clean).abs().mean()) < 0.02


def test_reference_round_trips_through_a_plain_dict(train_images) -> None:
    import json

    reference = IntensityReference.from_images(train_images)
    d = json.loads(json.dumps(reference.to_dict()))
    again = IntensityReference.from_dict(d)
    assert again == reference
    assert len(d["AP"]["quantiles"]) == len(LEVELS) and d["AP"]["images"] == len(train_images["AP"])
    assert len(d["AP"]["mean_image"]) == 32  # the 32 x 32 DRRs are small enough to keep whole
    with pytest.raises(ValueError, match="lack"):
        IntensityReference.from_dict({"levels": list(LEVELS), "AP": d["AP"]})


def test_from_manifest_summarises_the_training_split(tiny_prepared_dataset: Path, train_images) -> None:
    assert IntensityReference.from_manifest(tiny_prepared_dataset) == IntensityReference.from_images(train_images)
    limited = IntensityReference.from_manifest(tiny_prepared_dataset, limit=2)
    assert limited.views["AP"].images == 2


def test_padding_stays_air(train_images) -> None:
    reference = IntensityReference.from_images(train_images)
    image = train_images["AP"][0] ** 0.7
    valid = torch.ones_like(image, dtype=torch.bool)
    valid[0, :, :4] = False
    matched, _ = reference.match(torch.where(valid, image, torch.zeros(())), "AP", valid)
    assert float(matched[0, :, :4].abs().max()) == 0.0
