"""DICOM series -> NIfTI: grouping, HU rescale, affine / orientation, failures, resume."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import torchio as tio
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dataset import image_to_volume, read_ct
from dataset.convert_dicom import find_dicom_series, main, read_dicom_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _slice(path: Path, pixels: np.ndarray, ipp, iop, uid: str, number: int = 1, spacing=(2.0, 1.5),
           slope: float = 1.0, intercept: float = 0.0, instance: int = 1) -> None:
    """One CT slice file; ``pixels`` (rows, cols) int16 stored values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "CT", "P7", "1.2.3"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = uid, number, instance
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixels.dtype == np.float32:  # Float Pixel Data (the only DICOM pixels that can hold NaN)
        ds.BitsAllocated = 32
        ds.FloatPixelData = pixels.tobytes()
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _points(iop, ipp0, step: float, shape=(5, 4, 6), spacing=(2.0, 1.5)) -> np.ndarray:
    """LPS mm of every pixel: ``(K, rows, cols, 3)`` for slices stepping along the normal."""
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row_dir, col_dir)
    k, r, c = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (np.asarray(ipp0) + k[..., None] * step * normal + r[..., None] * spacing[0] * col_dir
            + c[..., None] * spacing[1] * row_dir)


def _series(folder: Path, iop, value_of, uid: str | None = None, number: int = 1, shape=(5, 4, 6),
            slope: float = 1.0, intercept: float = 0.0, skip: int | None = None, prefix: str = "im") -> str:
    """A series whose stored value at each pixel is ``value_of(lps_point)``; files in reversed order."""
    uid = uid or generate_uid()
    pts = _points(iop, (-10.0, 20.0, 30.0), 3.0, shape)
    for k in range(shape[0]):
        if k == skip:
            continue
        stored = np.rint((value_of(pts[k]) - intercept) / slope)
        _slice(folder / f"{prefix}{shape[0] - k:03d}.dcm", stored, pts[k, 0, 0], iop, uid, number,
               slope=slope, intercept=intercept, instance=k + 1)
    return uid


def test_two_series_in_one_folder_and_a_nested_one(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    hu = lambda p: 5.0 * p[..., 0] - 3.0 * p[..., 1] + 2.0 * p[..., 2]  # noqa: E731
    uid_a = _series(src / "patient" / "study", AXIAL, hu, number=2, slope=2.0, intercept=-1024.0, prefix="a")
    uid_b = _series(src / "patient" / "study", SAGITTAL, hu, number=5, prefix="b")
    _series(src / "other" / "deep", CORONAL, hu)
    (src / "notes.txt").write_text("not DICOM")
    assert main(["--input", str(src), "--out", str(out), "--no-progress"]) == 0
    assert "3 series: 3 prepared" in capsys.readouterr().out
    index = pd.read_csv(out / "series.csv", dtype=str)
    assert sorted(index["file"]) == ["other_deep.nii.gz", "patient_study_s2.nii.gz", "patient_study_s5.nii.gz"]
    assert dict(zip(index["file"], index["series_uid"]))["patient_study_s2.nii.gz"] == uid_a
    for name, uid in (("patient_study_s2", uid_a), ("patient_study_s5", uid_b)):
        nii = nib.load(str(out / f"{name}.nii.gz"))
        data = np.asarray(nii.dataobj)
        assert nii.get_data_dtype() == np.int16
        # every voxel holds hu(its own LPS position): the affine and the stacking agree
        ijk = np.stack(np.meshgrid(*(np.arange(n) for n in data.shape), indexing="ij"), -1).reshape(-1, 3)
        ras = nib.affines.apply_affine(nii.affine, ijk)
        lps = ras * np.array([-1.0, -1.0, 1.0])
        assert np.allclose(data.reshape(-1), np.rint(hu(lps)), atol=1.0)
        # independent reader: SimpleITK / GDCM on the same files gives the same geometry and values
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(src / "patient" / "study"), uid))
        ref_data, ref_affine = tio.io.sitk_to_nib(reader.Execute())
        assert np.allclose(ref_affine, nii.affine, atol=1e-4)
        assert np.allclose(ref_data[0], data)


@pytest.mark.parametrize("iop", [AXIAL, SAGITTAL, CORONAL])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_orientation_lands_in_our_layout(iop, axis: int, tmp_path: Path) -> None:
    # LPS: x -> patient left, y -> posterior, z -> superior; our W: right->left, H: ant->post, D: sup->inf
    _series(tmp_path / "s", iop, lambda p: 10.0 * p[..., axis], shape=(6, 5, 4))
    image = read_dicom_series(sorted((tmp_path / "s").iterdir()))
    volume, _ = image_to_volume(image)
    dim = {0: 3, 1: 2, 2: 1}[axis]
    diffs = volume.diff(dim=dim)
    sign = -1 if axis == 2 else 1  # z (superior) decreases along D
    assert bool((sign * diffs > 0).all())
    for other in {1, 2, 3} - {dim}:
        assert torch.equal(volume.diff(dim=other), torch.zeros_like(volume.diff(dim=other)))


def test_round_trip_through_read_ct(tmp_path: Path) -> None:
    _series(tmp_path / "src" / "s", AXIAL, lambda p: p[..., 2] * 7.0, slope=0.5, intercept=-1000.0)
    assert main(["--input", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress",
                 "--dtype", "float32"]) == 0
    image = read_ct(tmp_path / "out" / "s.nii.gz")
    assert image.data.dtype == torch.float32 and image.spatial_shape == (6, 4, 5)
    assert np.allclose(image.spacing, (1.5, 2.0, 3.0))


def test_missing_slice_fails_that_series_only(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _series(src / "good", AXIAL, lambda p: p[..., 0])
    _series(src / "gappy", AXIAL, lambda p: p[..., 0], skip=2)
    assert main(["--input", str(src), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "1 prepared" in text and "1 failed" in text and "gappy" in text and "missing" in text
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "series.csv"]


def test_mixed_slice_sizes_fail_with_the_reason(tmp_path: Path) -> None:
    uid = _series(tmp_path / "s", AXIAL, lambda p: p[..., 0], shape=(3, 4, 6))
    _slice(tmp_path / "s" / "odd.dcm", np.zeros((5, 6)), (-10.0, 20.0, 39.0), AXIAL, uid)
    with pytest.raises(ValueError, match=r"odd.dcm is \(5, 6\) pixels"):
        read_dicom_series(sorted((tmp_path / "s").iterdir()), "s")


def test_resume_skips_existing(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _series(src / "a", AXIAL, lambda p: p[..., 0])
    assert main(["--input", str(src), "--out", str(out), "--no-progress"]) == 0
    mtime = (out / "a.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["--input", str(src), "--out", str(out), "--no-progress"]) == 0
    assert "0 prepared, 1 skipped" in capsys.readouterr().out
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime


def test_corrupt_file_is_reported(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _series(src / "a", AXIAL, lambda p: p[..., 0])
    (src / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff\x13garbage")
    series, unreadable = find_dicom_series(src)
    assert len(series) == 1 and list(unreadable) == [str(src / "broken.dcm")]
    assert main(["--input", str(src), "--out", str(out), "--no-progress"]) == 0
    assert "broken.dcm" in capsys.readouterr().out


def test_truncated_pixels_only_input_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _series(src / "a", AXIAL, lambda p: p[..., 0], shape=(2, 4, 6))
    first = sorted((src / "a").iterdir())[0]
    first.write_bytes(first.read_bytes()[:-20])
    assert main(["--input", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all 1 series failed" in err[0]
    assert not out.exists() or not any(out.rglob("*"))


def test_nan_pixels_fail_the_series(tmp_path: Path, capsys) -> None:
    uid = generate_uid()
    for k in range(3):
        pixels = np.full((4, 5), 40.0, np.float32)
        pixels[1, 2] = np.nan if k == 1 else 0.0
        _slice(tmp_path / "src" / "s" / f"{k}.dcm", pixels, (0.0, 0.0, 2.0 * k), AXIAL, uid)
    with pytest.raises(ValueError, match="1 voxels are NaN"):
        read_dicom_series(sorted((tmp_path / "src" / "s").iterdir()), "s")
    assert main(["--input", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "NaN" in capsys.readouterr().out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "not_a_folder"])
def test_bad_input_exits_2_with_one_line(case: str, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
        (src / "readme.txt").write_text("no images")
    elif case == "not_a_folder":
        src.write_text("a file")
    assert main(["--input", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(src) in err[0]
    assert not (tmp_path / "out").exists()
