"""DRR geometry options of dataset.prepare / prepare_demo: per-subject jitter, manifest columns, batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from dataset import DatasetInfo, Manifest, PairedDataModule, chest_phantom, image_to_volume, read_ct, render_drr_pair
from dataset import write_nifti
from dataset.drr import DRRGeometry
from dataset.prepare import GeometryJitter, geometry_from_args, main
from dataset.prepare_demo import build_parser as demo_parser
from dataset.preprocess import Preprocessor

ARGS = ["--size", "16", "--spacing", "16", "--drr-size", "16", "--no-progress"]
JITTER = ["--jitter-sdd", "1000", "1800", "--jitter-sid", "700", "950", "--jitter-offset", "10", "--jitter-angle", "3"]
BASE = DRRGeometry.uniform(1500, 1000, 16, 2.0)


def _raw(folder: Path, n: int) -> Path:
    folder.mkdir(exist_ok=True)
    for i in range(n):
        write_nifti(chest_phantom((16, 16, 16), (15.0, 15.0, 15.0), seed=i), folder / f"p{i}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def jittered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """manifest.csv of 5 phantom subjects prepared with geometry jitter (16^3 CT, 16^2 DRRs, seed 0)."""
    root = tmp_path_factory.mktemp("jittered")
    assert main(["--input", str(_raw(root / "raw", 5)), "--out", str(root / "out"), *ARGS, *JITTER]) == 0
    return root / "out" / "manifest.csv"


def test_jitter_is_seeded_per_subject_and_stays_in_its_ranges() -> None:
    jitter = GeometryJitter((1000, 1800), (700, 950), 10.0, 3.0, seed=4)
    a = jitter.sample(BASE, "s1")
    assert a == jitter.sample(BASE, "s1") == GeometryJitter((1000, 1800), (700, 950), 10.0, 3.0, seed=4).sample(BASE, "s1")
    assert a != jitter.sample(BASE, "s2") and a != GeometryJitter((1000, 1800), (700, 950), 10.0, 3.0, seed=5).sample(BASE, "s1")
    draws = [jitter.sample(BASE, f"s{i}") for i in range(50)]
    views = [d.view(v) for d in draws for v in ("AP", "LAT")]
    assert all(1000 <= v.sdd <= 1800 and 700 <= v.sid <= 950 and abs(v.angle) <= 3 for v in views)
    assert all(abs(o) <= 10 for v in views for o in v.offset)
    assert all(v.detector_size == (16, 16) and v.pixel_spacing == (2.0, 2.0) for v in views)  # pixel grid kept
    assert max(v.sdd for v in views) - min(v.sdd for v in views) > 600  # the range is really used
    assert min(v.angle for v in views) < -2 and max(v.angle for v in views) > 2
    assert any(d.ap.sdd != d.lat.sdd for d in draws)  # each view drawn on its own
    # enabling the angle does not change the distances drawn for the same subject and seed
    assert GeometryJitter((1000, 1800), None, 0, 0, 4).sample(BASE, "s1").ap.sdd == a.ap.sdd


def test_prepare_with_jitter_writes_each_subjects_geometry(jittered: Path, capsys) -> None:
    info = DatasetInfo.load(jittered.parent)
    frame = Manifest.load(jittered).frame
    assert info.geometry.ap.sdd == 1500 and info.geometry.ap.sid == 1000 and info.geometry.is_uniform
    assert info.extra["geometry_jitter"] == {"sdd": [1000.0, 1800.0], "sid": [700.0, 950.0], "offset_mm": 10.0,
                                             "angle_deg": 3.0, "seed": 0}
    assert set(DRRGeometry().to_columns()) <= set(frame.columns)
    jitter = GeometryJitter((1000, 1800), (700, 950), 10, 3, seed=0)
    geometries = [DRRGeometry.from_columns(row, info.geometry) for _, row in frame.iterrows()]
    assert geometries == [jitter.sample(info.geometry, sid) for sid in frame["subject_id"]]
    assert len({g.ap.sdd for g in geometries}) == len(frame)
    # without --pixel-spacing the pitch fits the volume at the largest magnification (1800 / 700)
    fit = DRRGeometry.fit(info.shape, info.spacing, 16, 1800, 700)
    assert info.geometry.ap.pixel_spacing == fit.ap.pixel_spacing
    # every DRR was rendered with its subject's own geometry
    for (_, row), g in list(zip(frame.iterrows(), geometries))[:2]:
        volume, spacing = image_to_volume(read_ct(row["ct"]))
        ap, lat = render_drr_pair(info.window.to_unit(volume), spacing, g, info.window)
        torch.testing.assert_close(ap, torch.load(row["ap"], weights_only=True), rtol=0, atol=1e-5)
        torch.testing.assert_close(lat, torch.load(row["lat"], weights_only=True), rtol=0, atol=1e-5)
        other, _ = render_drr_pair(info.window.to_unit(volume), spacing, info.geometry, info.window)
        assert (other - ap).abs().max() > 0.05  # the default geometry would give another image


def test_same_seed_same_geometries_and_resume_keeps_them(jittered: Path, tmp_path: Path, capsys) -> None:
    raw = _raw(tmp_path / "raw", 5)
    assert main(["--input", str(raw), "--out", str(tmp_path / "a"), *ARGS, *JITTER]) == 0
    cols = list(DRRGeometry().to_columns())
    first = pd.read_csv(jittered)[["subject_id", *cols]]
    again = pd.read_csv(tmp_path / "a" / "manifest.csv")[["subject_id", *cols]]
    pd.testing.assert_frame_equal(first, again)
    capsys.readouterr()
    assert main(["--input", str(raw), "--out", str(tmp_path / "a"), *ARGS, *JITTER]) == 0  # resume
    assert "0 prepared, 5 skipped" in capsys.readouterr().out
    pd.testing.assert_frame_equal(first, pd.read_csv(tmp_path / "a" / "manifest.csv")[["subject_id", *cols]])
    assert main(["--input", str(raw), "--out", str(tmp_path / "b"), *ARGS, *JITTER, "--jitter-seed", "7"]) == 0
    other = pd.read_csv(tmp_path / "b" / "manifest.csv")
    assert not (other["ap_sdd"].to_numpy() == first["ap_sdd"].to_numpy()).any()
    # resuming with another jitter is refused
    assert main(["--input", str(raw), "--out", str(tmp_path / "a"), *ARGS, *JITTER[:-1], "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "geometry_jitter" in err[0]


def test_without_jitter_the_manifest_has_no_geometry_columns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--input", str(_raw(tmp_path / "raw", 3)), "--out", str(out), *ARGS,
                 "--sdd", "1200", "--sid", "800", "--pixel-spacing", "3.5"]) == 0
    frame = pd.read_csv(out / "manifest.csv")
    assert not set(DRRGeometry().to_columns()) & set(frame.columns)
    assert DatasetInfo.load(out).geometry == DRRGeometry.uniform(1200, 800, 16, 3.5)
    assert "geometry_jitter" not in json.loads((out / "dataset.json").read_text())


@pytest.mark.parametrize(
    "args,match",
    [
        (["--jitter-sdd", "1800", "1000"], "--jitter-sdd 1800 1000 is invalid; expected 0 < MIN <= MAX"),
        (["--jitter-sid", "900", "1600"], "jitter ranges allow sid=1600 mm >= sdd=1500 mm"),
        (["--jitter-sdd", "1000", "1800", "--jitter-sid", "800", "1000"], "sid=1000 mm >= sdd=1000 mm"),
        (["--jitter-angle", "50"], "argument --jitter-angle: value=50.0 is out of range; expected a finite value in [0, 45]"),
        (["--jitter-offset", "-1"], "argument --jitter-offset: value=-1.0 is out of range"),
        (["--jitter-sdd", "1000", "nan"], "not a finite number"),
        (["--pixel-spacing", "0"], "argument --pixel-spacing: value=0.0 is out of range"),
        (["--sdd", "900"], "sdd=900.0 must exceed sid=1000.0"),
        (["--sid", "50"], "sid=50 mm puts the source inside the volume"),
        (["--jitter-sid", "50", "600"], "sid=50 mm puts the source inside the volume"),
        (["--drr-size", "1"], "argument --drr-size: value=1 is out of range"),
    ],
)
def test_bad_geometry_options_exit_2_in_one_line(args: list[str], match: str, tmp_path: Path, capsys) -> None:
    raw = _raw(tmp_path / "raw", 1)
    try:
        code = main(["--input", str(raw), "--out", str(tmp_path / "out"), *ARGS, *args])
    except SystemExit as e:  # argparse-level errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "out").exists()


def test_prepare_demo_takes_the_geometry_options() -> None:
    args = demo_parser().parse_args(["--out", "X", "--sdd", "1200", "--sid", "800", "--drr-size", "96",
                                     "--pixel-spacing", "2.5", *JITTER, "--seed", "3"])
    pre = Preprocessor(shape=64, spacing=5.6)
    base, jitter = geometry_from_args(args, pre)
    assert base == DRRGeometry.uniform(1200, 800, 96, 2.5)
    assert jitter == GeometryJitter((1000, 1800), (700, 950), 10.0, 3.0, seed=3)  # --seed seeds the jitter
    base, jitter = geometry_from_args(demo_parser().parse_args(["--out", "X"]), pre)
    assert jitter is None and base == DRRGeometry.fit(pre.shape, pre.spacing, 64)  # the defaults as before


@pytest.mark.slow
def test_prepare_demo_with_jitter(tmp_path: Path) -> None:
    from dataset.prepare_demo import main as demo_main

    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), "--subjects", "3", "--size", "16", "--drr-size", "16", *JITTER,
                      "--no-progress"]) == 0
    frame = Manifest.load(out / "manifest.csv").frame
    info = DatasetInfo.load(out)
    geometries = {DRRGeometry.from_columns(row, info.geometry) for _, row in frame.iterrows()}
    assert len(geometries) == 3 and info.geometry not in geometries


def test_batches_carry_each_pairs_geometry(jittered: Path, tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    info = DatasetInfo.load(jittered.parent)
    dm = PairedDataModule(jittered, batch_size=5, load=("ap", "lat"))
    dm.setup("fit")
    items = [dm.datasets[s][i] for s in ("train", "val", "test") for i in range(len(dm.datasets[s]))]
    frame = Manifest.load(jittered).frame.set_index("subject_id")
    for item in items:
        assert item["geometry"].dtype == torch.float32 and item["geometry"].shape == (2, 10)
        expected = DRRGeometry.from_columns(frame.loc[item["subject_id"]], info.geometry).to_tensor(torch.float32)
        assert torch.equal(item["geometry"], expected)
    batch = next(iter(dm.train_dataloader()))
    assert batch["geometry"].shape == (len(dm.datasets["train"]), 2, 10)
    # a dataset without geometry columns: every pair has the dataset.json geometry
    plain = PairedDataModule(tiny_prepared_dataset, batch_size=2, load=("ap",))
    batch = next(iter(plain.train_dataloader()))
    default = DatasetInfo.load(tiny_prepared_dataset.parent).geometry.to_tensor(torch.float32)
    assert torch.equal(batch["geometry"], default.expand(2, -1, -1))
    # geometry columns without a default geometry in dataset.json are refused, naming both files
    copy = tmp_path / "copy"
    shutil.copytree(jittered.parent, copy)
    d = json.loads((copy / "dataset.json").read_text())
    del d["geometry"]
    (copy / "dataset.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="has geometry columns .* records no default DRR geometry"):
        PairedDataModule(copy / "manifest.csv", load=("ap",)).setup("fit")
    # a column that is not a number names its subject
    frame = pd.read_csv(jittered, dtype=str)
    frame.loc[0, "lat_angle"] = "tilted"
    shutil.copy(jittered.parent / "dataset.json", copy / "dataset.json")
    frame.to_csv(copy / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=rf"subject {frame.loc[0, 'subject_id']}: manifest column lat_angle='tilted'"):
        PairedDataModule(copy / "manifest.csv", load=("ap",)).setup("fit")
    # a value that makes an impossible geometry names its subject and columns as well
    frame.loc[0, "lat_angle"] = "0"
    frame.loc[0, "ap_sdd"] = "-5"
    frame.to_csv(copy / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=rf"subject {frame.loc[0, 'subject_id']}: manifest geometry columns \(.*ap_sdd"):
        PairedDataModule(copy / "manifest.csv", load=("ap",)).setup("fit")
