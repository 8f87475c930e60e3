"""Volume -> point-cloud CSV by threshold: units, world coordinates, bad inputs."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from dataset import HUWindow, chest_phantom, image_to_volume, write_nifti
from dataset.convert_volume_points import main, volume_to_points

SPACING = (6.0, 5.0, 4.0)


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    path = tmp_path / "gen.nii.gz"
    write_nifti(chest_phantom((16, 14, 18), SPACING, seed=2), path, dtype=torch.int16)
    return path


def _fails(argv: list[str], capsys, *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]


def test_hu_threshold_keeps_bone_in_world_mm(ct: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bone.csv"
    assert main(["--input", str(ct), "--out", str(out), "--threshold", "300"]) == 0
    assert "HU" in capsys.readouterr().out
    points = pd.read_csv(out)
    assert list(points.columns) == ["x", "y", "z", "value"]
    nii = nib.load(str(ct))
    data = np.asarray(nii.dataobj)
    ijk = np.argwhere(data >= 300)
    assert len(points) == len(ijk) and (points["value"] >= 300).all()
    assert np.allclose(points[["x", "y", "z"]].to_numpy(), nib.affines.apply_affine(nii.affine, ijk), atol=1e-3)
    # the phantom's spine (>= 300 HU) is posterior: RAS y (anterior +) below the body's centre
    centre = nib.affines.apply_affine(nii.affine, (np.array(data.shape) - 1) / 2)
    assert points["y"].mean() < centre[1] - 10


def test_unit_values_and_pt_input(ct: Path, tmp_path: Path, capsys) -> None:
    from dataset import read_ct

    window = HUWindow(-1000, 1000)
    volume, spacing = image_to_volume(read_ct(ct))
    torch.save(window.to_unit(volume), tmp_path / "gen.pt")  # (1, D, H, W) network range
    out = tmp_path / "unit.csv"
    assert main(["--input", str(tmp_path / "gen.pt"), "--out", str(out), "--threshold", "0.3", "--values", "unit",
                 "--spacing", *map(str, spacing)]) == 0
    assert "300.0 HU" in capsys.readouterr().out
    points = pd.read_csv(out)
    assert len(points) == int((volume >= 300 - 1e-3).sum()) and points["value"].between(0.3, 1.0).all()
    # the centred LPI frame: the spine is posterior (RAS y < 0)
    assert points["y"].mean() < -10


def test_max_points_is_a_seeded_subset(ct: Path) -> None:
    from dataset import read_ct

    image = read_ct(ct)
    full = volume_to_points(image, 0.0)
    a, b = volume_to_points(image, 0.0, max_points=50, seed=1), volume_to_points(image, 0.0, max_points=50, seed=1)
    assert len(a) == 50 and a.equals(b) and len(full) > 50
    assert a.merge(full, on=["x", "y", "z", "value"]).shape[0] == 50


def test_bad_inputs_exit_2_and_write_nothing(ct: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.csv"
    _fails(["--input", str(tmp_path / "none.nii.gz"), "--out", str(out), "--threshold", "0"], capsys, "none.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage" * 10)
    _fails(["--input", str(tmp_path / "bad.nii.gz"), "--out", str(out), "--threshold", "0"], capsys, "bad.nii.gz")
    nan = np.asarray(nib.load(str(ct)).dataobj).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    _fails(["--input", str(tmp_path / "nan.nii.gz"), "--out", str(out), "--threshold", "0"], capsys, "nan.nii.gz", "NaN")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "two.nii.gz"))
    _fails(["--input", str(tmp_path / "two.nii.gz"), "--out", str(out), "--threshold", "0"], capsys, "two.nii.gz",
           "expected")
    torch.save(torch.zeros(3, 4), tmp_path / "flat.pt")
    _fails(["--input", str(tmp_path / "flat.pt"), "--out", str(out), "--threshold", "0"], capsys, "flat.pt", "3-D")
    _fails(["--input", str(ct), "--out", str(out), "--threshold", "5000"], capsys, "no voxel >= 5000")
    _fails(["--input", str(ct), "--out", str(out), "--threshold", "0.5", "--values", "unit"], capsys,
           "expected [-1, 1]")
    torch.save(torch.rand(5, 5, 5) * 2 - 1, tmp_path / "unit.pt")
    _fails(["--input", str(tmp_path / "unit.pt"), "--out", str(out), "--threshold", "300"], capsys,
           "not Hounsfield units", "--values unit")
    _fails(["--input", str(ct), "--out", str(tmp_path / "p.txt"), "--threshold", "0"], capsys, ".csv")
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))


def test_converters_are_reexported_as_functions() -> None:
    import dataset
    import dataset.convert_dicom  # noqa: F401  (importing the submodules must not shadow the functions)
    import dataset.convert_h5_points  # noqa: F401
    import dataset.convert_volume_points  # noqa: F401

    for name in ("convert_dicom_folder", "read_dicom_series", "convert_pt_dataset", "convert_h5_point_clouds",
                 "voxelize_points", "volume_to_point_csv", "volume_to_points"):
        assert name in dataset.__all__ and callable(getattr(dataset, name)), name
