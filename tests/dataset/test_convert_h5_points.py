"""HDF5 point clouds -> voxel NIfTI (occupancy / Gaussian splat) and bad inputs."""

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from dataset.convert_h5_points import main, voxelize_points
from dataset.convert_volume_points import main as points_main


def _h5(path: Path, clouds: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for name, data in clouds.items():
            f.create_dataset(name, data=data)
    return path


def _clouds(n: int = 3, p: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, p, 3)) * [10.0, 5.0, 2.0] + [100.0, -50.0, 3.0]).astype(np.float32)


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each row of ``a`` to its nearest row of ``b``."""
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(1)


def test_occupancy_round_trips_through_the_point_csv(tmp_path: Path, capsys) -> None:
    clouds = _clouds()
    h5 = _h5(tmp_path / "shapes.h5", {"group/points": clouds, "labels": np.arange(3)})
    out = tmp_path / "vox"
    assert main(["--input", str(h5), "--out", str(out), "--voxel-size", "16", "--no-progress"]) == 0
    files = sorted(p.name for p in out.glob("*.nii.gz"))
    assert files == ["shapes_0000.nii.gz", "shapes_0001.nii.gz", "shapes_0002.nii.gz"]
    for i, name in enumerate(files):
        nii = nib.load(str(out / name))
        data = np.asarray(nii.dataobj)
        assert data.shape == (16, 16, 16) and nii.get_data_dtype() == np.uint8 and set(np.unique(data)) == {0, 1}
        # the margin of 2 voxels stays empty
        assert data[:2].sum() == data[-2:].sum() == data[:, :2].sum() == data[:, :, -2:].sum() == 0
        csv = tmp_path / f"{i}.csv"
        assert points_main(["--input", str(out / name), "--out", str(csv), "--threshold", "1", "--values", "raw"]) == 0
        back = np.loadtxt(csv, delimiter=",", skiprows=1)[:, :3]
        half_diagonal = nii.affine[0, 0] * np.sqrt(3) / 2 + 1e-4
        # every point lands in a kept voxel, and every kept voxel holds a point: back in cloud coordinates
        assert _nearest(clouds[i].astype(np.float64), back).max() <= half_diagonal
        assert _nearest(back, clouds[i].astype(np.float64)).max() <= half_diagonal
    capsys.readouterr()


def test_gaussian_splat_values() -> None:
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    volume, affine = voxelize_points(points, 9, "gaussian", sigma=1.0, margin=2)
    # span 9 - 1 - 4 = 4 voxels for 1 unit: points at voxels (2, 2, 2) and (6, 6, 6)
    assert np.allclose(affine[:3, :3], np.eye(3) * 0.25) and np.allclose(affine[:3, 3], -0.5)
    assert volume.dtype == torch.float32 and float(volume.max()) == 1.0
    assert volume[2, 2, 2] == 1.0 and volume[6, 6, 6] == 1.0
    assert torch.isclose(volume[3, 2, 2], torch.tensor(np.exp(-0.5), dtype=torch.float32))
    assert torch.isclose(volume[3, 3, 2], torch.tensor(np.exp(-1.0), dtype=torch.float32))
    assert volume[4, 4, 4] == 0  # sqrt(12) voxels from both points: beyond the 3-sigma cut
    assert torch.isclose(volume[4, 3, 3], torch.tensor(np.exp(-3.0), dtype=torch.float32))
    assert torch.allclose(volume, volume.flip(0, 1, 2))  # symmetric about the centre
    wider, _ = voxelize_points(points, 9, "gaussian", sigma=2.0, margin=2)
    assert (wider > 0).sum() > (volume > 0).sum()


def test_gaussian_cli_and_shared_scale(tmp_path: Path) -> None:
    small = _clouds(1, 30, seed=1)[0]
    big = (small - small.mean(0)) * 2 + small.mean(0)
    h5 = _h5(tmp_path / "c.h5", {"pc": np.stack([small, big])})
    for scale in ("per-cloud", "shared"):
        out = tmp_path / scale
        assert main(["--input", str(h5), "--out", str(out), "--voxel-size", "20", "--method", "gaussian",
                     "--sigma", "1.5", "--scale", scale, "--prefix", "s", "--no-progress"]) == 0
        a, b = (nib.load(str(out / f"s_000{i}.nii.gz")) for i in (0, 1))
        assert a.get_data_dtype() == np.float32 and np.asarray(a.dataobj).max() == pytest.approx(1.0)
        if scale == "shared":
            assert np.allclose(a.affine, b.affine)  # one box: the small cloud covers fewer voxels
            assert (np.asarray(a.dataobj) > 0.5).sum() < (np.asarray(b.dataobj) > 0.5).sum()
        else:
            assert np.allclose(a.affine[:3, :3] * 2, b.affine[:3, :3])


def _fails(argv: list[str], capsys, *needles: str) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # the argument parser refuses bad numbers itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_inputs_exit_2_and_write_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--out", str(out), "--voxel-size", "8", "--no-progress"]
    _fails(["--input", str(tmp_path / "missing.h5"), *args], capsys, "missing.h5", "no such file")
    (tmp_path / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"junk" * 20)
    _fails(["--input", str(tmp_path / "corrupt.h5"), *args], capsys, "corrupt.h5", "HDF5")
    other = _h5(tmp_path / "other.h5", {"meta/ids": np.arange(4), "feat": np.zeros((2, 5, 4), np.float32)})
    _fails(["--input", str(other), *args], capsys, "other.h5", "no float datasets of shape (N, P, 3)",
           "feat (2, 5, 4) float32", "meta/ids (4,) int64")
    _fails(["--input", str(other), "--dataset", "points", *args], capsys, "other.h5", "no dataset 'points'", "feat")
    _fails(["--input", str(other), "--dataset", "feat", *args], capsys, "'feat' is (2, 5, 4)", "(N, P, 3)")
    two = _h5(tmp_path / "two.h5", {"a": _clouds(), "b": _clouds()})
    _fails(["--input", str(two), *args], capsys, "2 float datasets", "--dataset")
    nan = _clouds()
    nan[1, 7, 2] = np.nan
    _fails(["--input", str(_h5(tmp_path / "nan.h5", {"pc": nan})), *args], capsys, "nan.h5", "cloud 1", "NaN")
    flat = _clouds()
    flat[2] = 1.0
    _fails(["--input", str(_h5(tmp_path / "flat.h5", {"pc": flat})), *args], capsys, "cloud 2", "coincide")
    good = _h5(tmp_path / "good.h5", {"pc": _clouds()})
    _fails(["--input", str(good), "--out", str(out), "--voxel-size", "4", "--margin", "2"], capsys, "margin")
    _fails(["--input", str(good), *args, "--method", "gaussian", "--sigma", "0"], capsys, "sigma")
    assert not out.exists()


def test_existing_outputs_need_overwrite(tmp_path: Path, capsys) -> None:
    h5 = _h5(tmp_path / "c.h5", {"pc": _clouds(2)})
    args = ["--input", str(h5), "--out", str(tmp_path / "out"), "--voxel-size", "8", "--no-progress"]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    _fails(args, capsys, "c_0000.nii.gz", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    assert main([*args, "--overwrite"]) == 0
