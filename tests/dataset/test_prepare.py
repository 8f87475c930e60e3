import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from dataset import DatasetInfo, HUWindow, Manifest, PairedDataset, chest_phantom, image_to_volume, read_ct
from dataset import render_drr_pair, write_nifti
from dataset.prepare import main

ARGS = ["--size", "16", "--spacing", "16", "--drr-size", "16", "--no-progress"]


def _raw(folder: Path, n: int, start: int = 0) -> Path:
    folder.mkdir(exist_ok=True)
    for i in range(start, start + n):
        write_nifti(chest_phantom((16, 16, 16), (15.0, 15.0, 15.0), seed=i), folder / f"p{i}.nii.gz")
    return folder


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_stored_drrs_match_stored_ct(tiny_prepared_dataset: Path) -> None:
    info = DatasetInfo.load(tiny_prepared_dataset.parent)
    row = Manifest.load(tiny_prepared_dataset).frame.iloc[0]
    volume, spacing = image_to_volume(read_ct(row["ct"]))
    assert volume.shape == (1, *info.shape) and spacing == info.spacing
    assert volume.min() >= info.window.hu_min and volume.max() <= info.window.hu_max
    ap, lat = render_drr_pair(info.window.to_unit(volume), spacing, info.geometry, info.window)
    assert torch.allclose(ap, torch.load(row["ap"], weights_only=True), atol=1e-5)
    assert torch.allclose(lat, torch.load(row["lat"], weights_only=True), atol=1e-5)


def test_resume_skips_done_and_keeps_splits(tmp_path: Path, capsys) -> None:
    raw, out = _raw(tmp_path / "raw", 4), tmp_path / "out"
    assert main(["--input", str(raw), "--out", str(out), *ARGS]) == 0
    first = pd.read_csv(out / "manifest.csv")
    ct_mtime = (out / "ct" / "p0.nii.gz").stat().st_mtime_ns
    assert "4 prepared, 0 skipped" in capsys.readouterr().out
    _raw(raw, 1, start=4)
    assert main(["--input", str(raw), "--out", str(out), *ARGS]) == 0
    assert "1 prepared, 4 skipped" in capsys.readouterr().out
    second = pd.read_csv(out / "manifest.csv")
    assert len(second) == 5 and (out / "ct" / "p0.nii.gz").stat().st_mtime_ns == ct_mtime
    merged = first.merge(second, on="subject_id")
    assert (merged["split_x"] == merged["split_y"]).all()
    # resuming with other settings is refused without touching anything
    before = _files(out)
    assert main(["--input", str(raw), "--out", str(out), *ARGS[:-1], "--hu-min", "-900", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different settings" in err[0] and "window" in err[0]
    assert _files(out) == before


def test_failures_are_recorded_and_the_rest_prepared(tmp_path: Path, capsys) -> None:
    raw, out = _raw(tmp_path / "raw", 2), tmp_path / "out"
    (raw / "broken.nii.gz").write_bytes(b"garbage")
    torch.save(torch.rand(8, 8, 8), raw / "normalised.pt")
    torch.save(torch.zeros(8, 8) - 1000, raw / "flat.pt")
    assert main(["--input", str(raw), "--out", str(out), *ARGS]) == 0
    text = capsys.readouterr().out
    assert "2 prepared, 0 skipped (already done), 3 failed" in text
    assert "failed broken:" in text and "failed normalised:" in text and "already normalised" in text
    assert "failed flat:" in text
    assert list(pd.read_csv(out / "manifest.csv")["subject_id"]) == ["p0", "p1"]
    assert not any("broken" in f or "normalised" in f or "flat" in f or ".tmp" in f for f in _files(out))


def test_all_failed_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    (raw / "a.nii").write_bytes(b"garbage")
    assert main(["--input", str(raw), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "all 1 subjects failed" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--out", "X"], "required: --input"),
        (["--input", "{missing}", "--out", "X"], "no such folder"),
        (["--input", "{empty}", "--out", "X"], "holds no CTs"),
        (["--input", "{raw}", "--out", "X", "--size", "16", "16"], "one or three values"),
        (["--input", "{raw}", "--out", "X", "--spacing", "-1"], "spacing"),
        (["--input", "{raw}", "--out", "X", "--hu-min", "5", "--hu-max", "0"], "HU window"),
        (["--input", "{raw}", "--out", "X", "--sdd", "100"], "sdd"),
        (["--input", "{raw}", "--out", "X", "--size", "abc"], "not an integer"),
        (["--input", "{raw}", "--out", "X", "--sid", "nan"], "argument --sid: 'nan' is not a finite number"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], match: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    _raw(tmp_path / "raw", 1)
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "raw": tmp_path / "raw"}
    args = [a.format(**paths).replace("X", str(tmp_path / "out")) for a in args]
    try:
        code = main(args)
    except SystemExit as e:  # argparse-level errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "out").exists()


def test_pt_layout_of_seed_000(tmp_path: Path) -> None:
    """``<ct_dir>/<id>.pt`` tensors in (D, H, W) HU, spacing given on the command line."""
    ct_dir = tmp_path / "ct_dir"
    ct_dir.mkdir()
    for i in range(3):
        volume, _ = image_to_volume(chest_phantom((16, 16, 16), (15.0, 15.0, 15.0), seed=i))
        torch.save(volume[0], ct_dir / f"case{i}.pt")
    out = tmp_path / "out"
    assert main(["--input", str(ct_dir), "--out", str(out), "--pt-spacing", "15", "15", "15", *ARGS]) == 0
    m = Manifest.load(out / "manifest.csv")
    assert sorted(m.frame["subject_id"]) == ["case0", "case1", "case2"]
    assert set(m.frame["split"]) == {"train", "val", "test"}


def test_paired_dataset_rejects_mismatched_views(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_prepared_dataset.parent, tmp_path / "ds")
    m = Manifest.load(tmp_path / "ds" / "manifest.csv")
    row = m.frame.iloc[2]
    torch.save(torch.rand(1, 20, 24), row["lat"])
    ds = PairedDataset(m.frame, load=("ap", "lat"), window=HUWindow())
    with pytest.raises(ValueError, match=f"subject {row['subject_id']}: AP .* and LAT .* differ"):
        ds[2]
    assert ds[0]["ap"].shape == (1, 32, 32)


def test_relative_output_folder_gives_a_loadable_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _raw(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    assert main(["--input", str(raw), "--out", "rel/out", *ARGS]) == 0
    monkeypatch.chdir("/")  # paths in the manifest are relative to the CSV, not to where prepare ran
    frame = Manifest.load(tmp_path / "rel" / "out" / "manifest.csv").frame
    assert len(frame) == 2 and all(Path(p).is_file() for p in frame.ct)


def test_all_subjects_failing_exits_2_and_writes_no_manifest(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    assert main(["--input", str(raw), "--out", str(out), *ARGS]) == 2
    captured = capsys.readouterr()
    assert "all 1 subjects failed; nothing written" in captured.err
    assert "failed broken" in captured.out  # the summary names the subject and why
    assert not (out / "manifest.csv").exists()


def test_prepared_cts_share_the_isocentre_frame_of_generated_cts(tiny_prepared_dataset: Path) -> None:
    import nibabel as nib
    import numpy as np
    import torchio as tio

    from evaluation.generation import CTGenerator

    info = DatasetInfo.load(tiny_prepared_dataset.parent)
    frame = info.extra["world_frame"]
    assert frame["convention"] == "isocentre"
    rows = Manifest.load(tiny_prepared_dataset).frame
    assert sorted(frame["scanner_centre_ras_mm"]) == sorted(rows["subject_id"])
    gen = CTGenerator(None, None, info.window, info.spacing, torch.device("cpu"))  # to_hu_image needs no network
    generated = gen.to_hu_image(torch.zeros(1, *info.shape)).affine
    raw = tiny_prepared_dataset.parent.parent / "raw"
    for row in rows.itertuples():
        affine = nib.load(row.ct).affine
        np.testing.assert_allclose(affine, generated, atol=1e-4)  # same grid: they overlay in a viewer
        np.testing.assert_allclose(affine @ [15.5, 15.5, 15.5, 1], [0, 0, 0, 1], atol=1e-4)  # centre at the origin
        # the scanner position of the volume centre is kept (within a voxel: crop / pad moves it by at most half)
        source = tio.ToOrientation("LPI")(tio.ScalarImage(raw / f"{row.subject_id}.nii.gz"))
        w, h, d = source.spatial_shape
        centre = (source.affine @ [(w - 1) / 2, (h - 1) / 2, (d - 1) / 2, 1])[:3]
        assert np.abs(np.asarray(frame["scanner_centre_ras_mm"][row.subject_id]) - centre).max() <= 8.0


def test_a_dataset_of_the_scanner_frame_is_refused_with_a_hint(tmp_path: Path, capsys) -> None:
    import json

    _raw(tmp_path / "raw", 3)
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "raw"), "--out", str(out), *ARGS]) == 0
    info = json.loads((out / "dataset.json").read_text())
    info.pop("world_frame")  # as written before prepared CTs were centred on the isocentre
    (out / "dataset.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["--input", str(tmp_path / "raw"), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older version" in err[0] and "new --out" in err[0]


def test_crop_warning_says_how_much_and_which_spacing_fits() -> None:
    from dataset.prepare import crop_warning

    # 32 x 8 mm = 256 mm field of view; subject a is 300 mm long: 1 - 256 / 300 = 14.7% cropped
    text = crop_warning({"a": [300.0, 200.0, 200.0], "b": [100.0, 100.0, 100.0]}, (32, 32, 32), (8.0, 8.0, 8.0))
    assert "covers 256 x 256 x 256 mm" in text and "1 of 2 CTs were cropped" in text
    assert "up to 15% of a's extent" in text and "--spacing 9.38" in text  # 300 mm / 32 voxels
    assert crop_warning({"b": [100.0, 100.0, 100.0]}, (32, 32, 32), (8.0, 8.0, 8.0)) is None


def test_prepare_warns_when_it_crops(tmp_path: Path, capsys) -> None:
    _raw(tmp_path / "raw", 3)  # 16 voxels x 15 mm = 240 mm; the target 16 x 8 mm = 128 mm crops them
    assert main(["--input", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--size", "16", "--spacing", "8",
                 "--drr-size", "16", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "3 of 3 CTs were cropped" in err[0] and "--spacing 15" in err[0]


def test_nested_dicom_tree_suggests_convert_dicom(tmp_path: Path, capsys) -> None:
    series = tmp_path / "tree" / "patient1" / "study1"
    series.mkdir(parents=True)
    (series / "slice1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    assert main(["--input", str(tmp_path / "tree"), "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no CTs" in err[0] and "python -m dataset.convert_dicom" in err[0]


def test_bad_split_fractions_are_refused_before_any_subject_is_written(tmp_path: Path, capsys) -> None:
    raw = _raw(tmp_path / "raw", 3)
    out = tmp_path / "out"
    assert main(["--input", str(raw), "--out", str(out), *ARGS, "--split", "0", "0", "0"]) == 2
    assert "split fractions (0.0, 0.0, 0.0) are invalid" in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_device_is_refused_before_any_subject_is_read(tmp_path: Path, capsys) -> None:
    raw = _raw(tmp_path / "raw", 3)
    out = tmp_path / "out"
    assert main(["--input", str(raw), "--out", str(out), *ARGS, "--device", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device 'bogus' is invalid; expected cpu, cuda or cuda:N" in err and len(err.splitlines()) == 1
    assert not out.exists()
