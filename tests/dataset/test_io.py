from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dataset import atomic_write, chest_phantom, image_to_volume, load_xray, read_ct, write_nifti
from dataset.io import atomic_save_torch


@pytest.fixture
def phantom():
    return chest_phantom((12, 10, 14), (3.0, 2.0, 2.5), seed=3)


def test_nifti_round_trip_keeps_geometry(phantom, tmp_path: Path) -> None:
    path = tmp_path / "ct.nii.gz"
    write_nifti(phantom, path, dtype=torch.int16)
    nii = nib.load(str(path))
    assert nii.get_data_dtype() == np.int16 and nii.header["sform_code"] == 1 and nii.header["qform_code"] == 1
    assert np.allclose(nii.affine, phantom.affine)
    image = read_ct(path)
    assert np.allclose(image.affine, phantom.affine) and image.data.dtype == torch.float32
    assert torch.equal(image.data, phantom.data.round())
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]  # no temporary left behind


def test_pt_tensor_and_dict(phantom, tmp_path: Path) -> None:
    volume, spacing = image_to_volume(phantom)
    torch.save(volume[0], tmp_path / "a.pt")
    torch.save({"ct": volume, "spacing": list(spacing)}, tmp_path / "b.pt")
    a = read_ct(tmp_path / "a.pt", pt_spacing=spacing)
    b = read_ct(tmp_path / "b.pt")
    for image in (a, b):
        back, sp = image_to_volume(image)
        assert torch.equal(back, volume) and sp == spacing


def test_dicom_series_folder(phantom, tmp_path: Path) -> None:
    hu = phantom.as_sitk()
    hu = sitk.Cast(sitk.Round(hu), sitk.sitkInt16)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.GetDepth()):
        s = hu[:, :, k]
        for key, value in (("0010|0020", "P1"), ("0020|000d", "1.2.3"), ("0020|000e", "1.2.3.4"),
                           ("0020|0013", str(k + 1)), ("0008|0060", "CT"),
                           ("0020|0032", "\\".join(map(str, hu.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0037", "\\".join(map(str, hu.GetDirection()[0:9:3] + hu.GetDirection()[1:9:3])))):
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    image = read_ct(folder)
    volume, spacing = image_to_volume(image)
    expected, exp_spacing = image_to_volume(phantom)
    assert np.allclose(spacing, exp_spacing)
    assert torch.equal(volume, expected.round())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_ct(tmp_path / "nope.nii.gz")
    with pytest.raises(FileNotFoundError, match="AP.pt"):
        load_xray(tmp_path / "AP.pt")


@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.nii", "bad.pt"])
def test_corrupt_file(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match=name):
        read_ct(path)


def test_non_image_formats(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown CT format"):
        read_ct(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no DICOM"):
        read_ct(tmp_path)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list"):
        read_ct(tmp_path / "list.pt")


def test_2d_image_rejected(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.full((20, 20), -500, np.int16), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(ValueError, match="slice.nii.gz.*2-D"):
        read_ct(tmp_path / "slice.nii.gz")
    torch.save(torch.zeros(20, 20) - 500, tmp_path / "slice.pt")
    with pytest.raises(ValueError, match="slice.pt.*3-D"):
        read_ct(tmp_path / "slice.pt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_rejected(bad: float, tmp_path: Path) -> None:
    data = np.full((8, 8, 8), -1000.0, np.float32)
    data[2, 3, 4] = bad
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "x.nii.gz"))
    with pytest.raises(ValueError, match="x.nii.gz: 1 voxels are NaN or Inf"):
        read_ct(tmp_path / "x.nii.gz")


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (0.0, 1.0)])
def test_already_normalised_rejected(lo: float, hi: float, tmp_path: Path) -> None:
    torch.save(torch.rand(8, 8, 8) * (hi - lo) + lo, tmp_path / "norm.pt")
    with pytest.raises(ValueError, match="norm.pt.*already normalised"):
        read_ct(tmp_path / "norm.pt")


def test_xray_loading(tmp_path: Path) -> None:
    torch.save(torch.rand(6, 7), tmp_path / "AP.pt")
    assert load_xray(tmp_path / "AP.pt").shape == (1, 6, 7)
    torch.save(torch.rand(2, 6, 7), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt.*shape"):
        load_xray(tmp_path / "bad.pt")
    x = torch.rand(1, 6, 7)
    x[0, 1, 1] = float("nan")
    torch.save(x, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="nan.pt.*NaN"):
        load_xray(tmp_path / "nan.pt")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    atomic_save_torch(torch.ones(2), tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True), torch.ones(2))


@pytest.mark.parametrize("mode,scale", [("L", 255.0), ("I;16", 65535.0)])
def test_xray_from_png_scales_by_bit_depth(tmp_path: Path, mode: str, scale: float) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, int(scale) + 1, size=(6, 7)).astype(np.uint8 if mode == "L" else np.uint16)
    Image.fromarray(pixels).save(tmp_path / "AP.png")  # uint8 -> "L", uint16 -> "I;16"
    x = load_xray(tmp_path / "AP.png")
    assert x.shape == (1, 6, 7)  # rows x columns as in the picture
    assert torch.allclose(x[0], torch.from_numpy(pixels.astype(np.float32)) / scale)


def test_xray_from_2d_nifti_reads_axis0_as_columns(tmp_path: Path) -> None:
    import nibabel as nib

    image = torch.rand(6, 7)  # (rows, cols)
    nib.save(nib.Nifti1Image(image.numpy().T, np.eye(4)), str(tmp_path / "AP.nii.gz"))
    assert torch.equal(load_xray(tmp_path / "AP.nii.gz")[0], image)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), str(tmp_path / "vol.nii.gz"))
    with pytest.raises(ValueError, match="vol.nii.gz.*2-D"):
        load_xray(tmp_path / "vol.nii.gz")


@pytest.mark.parametrize("name,content", [("AP.pt", b"not a tensor"), ("AP.png", b"\x89PNG broken"),
                                          ("AP.bmpx", b"whatever")])
def test_unreadable_xray_is_one_line_naming_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
        load_xray(tmp_path / name)
    assert len(str(err.value).splitlines()) == 1
