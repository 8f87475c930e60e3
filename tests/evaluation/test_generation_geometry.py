"""CTGenerator.sample with the X-ray pair's own geometry, and DRR re-projection with each case's geometry."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dataset import DatasetInfo, Manifest, chest_phantom, load_xray, write_nifti
from dataset.drr import DRRGeometry
from dataset.prepare import main as prepare_main
from evaluation.evaluate import evaluate_pairs, find_pairs
from evaluation.generation import CTGenerator
from tests.evaluation.test_generate_ct import checkpoints, pair  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


def test_sample_takes_the_pair_geometry(checkpoints: dict, pair: tuple, tiny_prepared_dataset: Path) -> None:
    gen = CTGenerator.from_checkpoints(checkpoints["xray"], checkpoints["ae"], device="cpu")
    default = DatasetInfo.load(tiny_prepared_dataset.parent).geometry
    assert gen.biflownet.geometry == default
    ap, lat = load_xray(pair[0]), load_xray(pair[1])

    def sample(**kw) -> torch.Tensor:
        return gen.sample(ap, lat, num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw)

    base = sample()
    assert torch.equal(sample(geometry=default), base)  # the training geometry is the default path
    tilted = default.replace_view("LAT", angle=6.0, offset=(0.0, 40.0)).replace_view("AP", sdd=1200.0)
    # sampling is deterministic, so any change comes from the geometry reaching the network (the random-weight
    # networks make it small after decoding)
    assert not torch.equal(sample(geometry=tilted), base)
    assert not torch.equal(sample(geometry=tilted, guidance_scale=2.0), sample(guidance_scale=2.0))
    with pytest.raises(ValueError, match=r"\(64, 64\) detector, but this network takes \(32, 32\) X-rays"):
        sample(geometry=DRRGeometry.uniform(1500, 1000, 64, 1.0))


def test_reprojection_uses_each_cases_geometry(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):
        write_nifti(chest_phantom((16, 16, 16), (15.0, 15.0, 15.0), seed=i), raw / f"p{i}.nii.gz")
    out = tmp_path / "data"
    assert prepare_main(["--input", str(raw), "--out", str(out), "--size", "16", "--spacing", "16", "--drr-size", "16",
                         "--jitter-sdd", "1000", "1800", "--jitter-sid", "700", "950", "--jitter-angle", "3",
                         "--no-progress"]) == 0
    info = DatasetInfo.load(out)
    pred = tmp_path / "pred"
    pred.mkdir()
    for row in Manifest.load(out / "manifest.csv").split("test").itertuples():
        shutil.copy(row.ct, pred / f"{row.subject_id}.nii.gz")  # a perfect prediction
    pairs = find_pairs(pred, out / "manifest.csv")
    assert all(p.geometry is not None and p.geometry != info.geometry for p in pairs)
    rows, _ = evaluate_pairs(pairs, info.window, info.geometry)
    rows_default, _ = evaluate_pairs([replace(p, geometry=None) for p in pairs], info.window, info.geometry)
    for own, default in zip(rows, rows_default):
        assert own["drr_ap_psnr_db"] > 60 and own["drr_lat_psnr_db"] > 60  # re-rendered with its own geometry
        assert default["drr_ap_psnr_db"] < own["drr_ap_psnr_db"] - 20
