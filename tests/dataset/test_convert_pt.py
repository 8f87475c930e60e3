"""Seed ``.pt`` layout -> prepared dataset: values, X-ray import, failures, resume, geometry."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.cli import exit_code
from dataset import DatasetInfo, HUWindow, Manifest, chest_phantom, image_to_volume, load_xray, read_ct
from dataset.convert_pt import XrayImport, main

SHAPE, SPACING = (12, 10, 14), (8.0, 8.0, 8.0)
ARGS = ["--spacing", "8", "8", "8", "--no-progress"]


def _hu(i: int) -> torch.Tensor:
    return image_to_volume(chest_phantom(SHAPE, SPACING, seed=i))[0][0]  # (D, H, W) HU


def _xray(i: int, rows: int = 20, cols: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    return torch.rand(rows, cols, generator=g) * 255.0  # 8-bit-like values, (H, W)


def _seed_layout(root: Path, n: int, ct=lambda i: _hu(i)) -> tuple[Path, Path]:
    cts, xrays = root / "ct", root / "xray"
    cts.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        torch.save(ct(i), cts / f"s{i}.pt")
        (xrays / f"s{i}").mkdir(parents=True, exist_ok=True)
        torch.save(_xray(i), xrays / f"s{i}" / "AP.pt")
        torch.save(_xray(i + 50)[None], xrays / f"s{i}" / "LAT.pt")
    return cts, xrays


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_hu_tensors_become_a_prepared_dataset(tmp_path: Path, capsys) -> None:
    cts, xrays = _seed_layout(tmp_path, 4)
    out = tmp_path / "out"
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(out), "--xray-size", "16", *ARGS]) == 0
    assert "4 subjects: 4 prepared" in capsys.readouterr().out
    manifest = Manifest.load(out / "manifest.csv")
    assert sorted(manifest.frame["subject_id"]) == ["s0", "s1", "s2", "s3"]
    assert sorted(manifest.frame["split"]) == ["test", "train", "train", "val"]
    info = DatasetInfo.load(out)
    assert info.geometry is None and "geometry" not in json.loads((out / "dataset.json").read_text())
    assert info.shape == SHAPE and info.spacing == SPACING and info.window == HUWindow(-1000, 1000)
    assert info.extra["xray"]["size"] == [16, 16] and "superior" in info.extra["xray"]["orientation"]
    for _, row in manifest.frame.iterrows():
        i = int(row["subject_id"][1:])
        volume, spacing = image_to_volume(read_ct(row["ct"]))
        assert spacing == SPACING and torch.equal(volume[0], _hu(i).clamp(-1000, 1000).round())
        for key, src in (("ap", _xray(i)), ("lat", _xray(i + 50))):
            x = load_xray(row[key])
            assert x.shape == (1, 16, 16) and x.min() >= 0 and x.max() <= 1
            # resizing the min-max normalised source by hand gives the same image
            ref = torch.nn.functional.interpolate(((src - src.min()) / (src.max() - src.min()))[None, None],
                                                  size=(16, 16), mode="bilinear", antialias=True)[0]
            assert torch.allclose(x, ref.clamp(0, 1), atol=1e-6)


def test_the_paired_datamodule_reads_the_result(tmp_path: Path) -> None:
    from dataset import PairedDataModule

    cts, xrays = _seed_layout(tmp_path, 3)
    out = tmp_path / "out"
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(out), *ARGS]) == 0
    dm = PairedDataModule(out / "manifest.csv", batch_size=1, load=("ap", "lat", "ct"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["ct"].shape == (1, 1, *SHAPE) and batch["ap"].shape == (1, 1, 20, 24)
    assert batch["ct"].min() >= -1 and batch["ct"].max() <= 1


@pytest.mark.parametrize("kind", ["unit", "unit01"])
def test_normalised_tensors_with_their_window(kind: str, tmp_path: Path, capsys) -> None:
    window = HUWindow(-1000, 1000)
    to_range = (lambda u: u) if kind == "unit" else (lambda u: (u + 1) / 2)
    cts, xrays = _seed_layout(tmp_path, 3, ct=lambda i: to_range(window.to_unit(_hu(i))))
    out = tmp_path / "out"
    # as HU they are refused with a hint at the option that accepts them
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ct-range unit:LO,HI" in err[0] and not out.exists()
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(out),
                 "--ct-range", f"{kind}:-1000,1000", *ARGS]) == 0
    volume, _ = image_to_volume(read_ct(out / "ct" / "s1.nii.gz"))
    assert (volume[0] - _hu(1).clamp(-1000, 1000)).abs().max() <= 1.0
    assert DatasetInfo.load(out).extra["converted_from"]["ct_range"] == f"{kind}:-1000,1000"


def test_out_of_range_normalised_tensor_fails_that_subject(tmp_path: Path, capsys) -> None:
    window = HUWindow()
    cts, xrays = _seed_layout(tmp_path, 3, ct=lambda i: window.to_unit(_hu(i)) * (3.0 if i == 2 else 1.0))
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(tmp_path / "out"),
                 "--ct-range", "unit:-1000,1000", *ARGS]) == 0
    text = capsys.readouterr().out
    assert "2 prepared" in text and "failed s2" in text and "expected [-1, 1]" in text


def test_xray_orientation_ops() -> None:
    marker = torch.zeros(1, 4, 6)
    marker[0, 0, 0] = 1.0  # top-left
    imp = XrayImport(ap_ops=("flip-cols",), lat_ops=("transpose", "flip-rows"), norm="clip")
    assert imp.orient(marker, "AP")[0, 0, 5] == 1
    lat = imp.orient(marker, "LAT")
    assert lat.shape == (1, 6, 4) and lat[0, 5, 0] == 1
    assert imp.normalise(marker, "x").equal(marker)
    assert XrayImport(norm="range:0,2", invert=True).normalise(marker * 2, "x").equal(1 - marker)
    with pytest.raises(ValueError, match="expected \\[0, 1\\]"):
        imp.normalise(marker * 5, "ap.pt")
    with pytest.raises(ValueError, match="op 'rotate'"):
        XrayImport(ap_ops=("rotate",))


def test_ct_axes_and_flip(tmp_path: Path) -> None:
    cts, xrays = _seed_layout(tmp_path, 3, ct=lambda i: _hu(i).permute(2, 1, 0).flip(2))  # stored (W, H, D), D flipped
    out = tmp_path / "out"
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(out), "--ct-axes", "WHD",
                 "--ct-flip", "D", *ARGS]) == 0
    volume, _ = image_to_volume(read_ct(out / "ct" / "s0.nii.gz"))
    assert torch.equal(volume[0], _hu(0).clamp(-1000, 1000).round())


def test_bad_subjects_are_recorded_and_the_rest_go_on(tmp_path: Path, capsys) -> None:
    cts, xrays = _seed_layout(tmp_path, 8)
    torch.save(_xray(9, 24, 20), xrays / "s1" / "LAT.pt")  # AP 20x24, LAT 24x20
    (xrays / "s2" / "LAT.pt").unlink()
    bad = _hu(3)
    bad[2, 3, 4] = float("nan")
    torch.save(bad, cts / "s3.pt")
    (cts / "s4.pt").write_bytes(b"not a tensor")
    torch.save(torch.zeros(12, 10), cts / "s5.pt")  # 2-D
    torch.save(torch.rand(3, 20, 24), xrays / "s6" / "AP.pt")  # RGB-like
    (xrays / "orphan").mkdir()
    torch.save(_xray(0), xrays / "orphan" / "AP.pt")
    out = tmp_path / "out"
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(out), *ARGS]) == 0
    text = capsys.readouterr().out
    assert "9 subjects: 2 prepared, 0 skipped (already done), 7 failed" in text
    assert "s5.pt: tensor has shape (12, 10); expected a 3-D CT" in text
    assert "s6/AP.pt: X-ray has shape (3, 20, 24)" in text
    assert "subject s1: AP is (20, 24) but LAT is (24, 20)" in text
    assert "s2/LAT.pt: no such file" in text and "NaN" in text and "s4.pt" in text and "no CT for subject orphan" in text
    assert sorted(Manifest.load(out / "manifest.csv").frame["subject_id"]) == ["s0", "s7"]
    assert sorted(p.name for p in (out / "xray").iterdir()) == ["s0", "s7"]
    assert sorted(p.name for p in (out / "ct").iterdir()) == ["s0.nii.gz", "s7.nii.gz"]


def test_resume_and_changed_settings(tmp_path: Path, capsys) -> None:
    cts, xrays = _seed_layout(tmp_path, 3)
    out = tmp_path / "out"
    args = ["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(out), *ARGS]
    assert main(args) == 0
    splits = pd.read_csv(out / "manifest.csv").set_index("subject_id")["split"].to_dict()
    before = _files(out)
    capsys.readouterr()
    _seed_layout(tmp_path, 4)  # one new subject (the others are rewritten with the same content)
    assert main(args) == 0
    assert "1 prepared, 3 skipped" in capsys.readouterr().out
    after = _files(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith(("ct/", "xray/")))
    assert {k: v for k, v in pd.read_csv(out / "manifest.csv").set_index("subject_id")["split"].items()
            if k in splits} == splits
    before = _files(out)
    assert main([*args, "--xray-norm", "range:0,255"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different settings" in err[0] and "xray" in err[0]
    assert _files(out) == before


def test_seeded_split_is_reproducible(tmp_path: Path) -> None:
    cts, xrays = _seed_layout(tmp_path, 6)
    frames = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(tmp_path / name),
                     "--seed", seed, *ARGS]) == 0
        frames.append(pd.read_csv(tmp_path / name / "manifest.csv").set_index("subject_id")["split"].sort_index())
    assert frames[0].equals(frames[1]) and not frames[0].equals(frames[2])


def test_geometry_only_when_given(tmp_path: Path, tiny_prepared_dataset: Path, capsys) -> None:
    cts, xrays = _seed_layout(tmp_path, 3)
    out = tmp_path / "out"
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(out),
                 "--geometry-from", str(tiny_prepared_dataset.parent), *ARGS]) == 0
    info, ref = DatasetInfo.load(out), DatasetInfo.load(tiny_prepared_dataset.parent)
    assert info.geometry == ref.geometry and "xray_geometry" not in info.extra
    assert load_xray(out / "xray" / "s0" / "AP.pt").shape == (1, *ref.geometry.detector_size)
    capsys.readouterr()
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(tmp_path / "o2"),
                 "--sdd", "1500", "--sid", "1000", *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pixel-spacing" in err[0]
    assert main(["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(tmp_path / "o3"), "--sdd", "1500",
                 "--sid", "1000", "--pixel-spacing", "3", "--xray-size", "16", *ARGS]) == 0
    assert DatasetInfo.load(tmp_path / "o3").geometry.detector_size == (16, 16)


@pytest.mark.parametrize("extra,needle", [
    (["--ct-range", "hu:1,2"], "--ct-range"),
    (["--ct-range", "unit:5,1"], "--ct-range"),
    (["--xray-norm", "range:3"], "--xray-norm"),
    (["--ct-axes", "DDW"], "--ct-axes"),
    (["--xray-size", "1", "2", "3"], "--xray-size"),
])
def test_bad_options_exit_2(extra: list[str], needle: str, tmp_path: Path, capsys) -> None:
    cts, xrays = _seed_layout(tmp_path, 3)
    argv = ["--ct-dir", str(cts), "--xray-dir", str(xrays), "--out", str(tmp_path / "out"), *extra, *ARGS]
    assert exit_code(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["ct", "xray"])
def test_missing_folders_exit_2(missing: str, tmp_path: Path, capsys) -> None:
    cts, xrays = _seed_layout(tmp_path, 1)
    gone = tmp_path / "nope"
    args = ["--ct-dir", str(gone if missing == "ct" else cts), "--xray-dir", str(gone if missing == "xray" else xrays)]
    assert main([*args, "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(gone) in err[0]
