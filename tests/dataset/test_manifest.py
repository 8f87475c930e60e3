import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from dataset import Manifest
from dataset.manifest import assign_splits


def test_assign_splits_seeded_complete_and_stable() -> None:
    ids = [f"s{i}" for i in range(20)]
    a = assign_splits(ids, seed=1)
    assert a == assign_splits(list(reversed(ids)), seed=1)  # input order does not matter
    assert a != assign_splits(ids, seed=2)
    counts = pd.Series(a).value_counts().to_dict()
    assert counts == {"train": 16, "val": 2, "test": 2}
    grown = assign_splits(ids + ["new1", "new2"], seed=1, existing=a)
    assert all(grown[k] == v for k, v in a.items())  # written once: old subjects never move
    tiny = assign_splits(["a", "b", "c"], seed=0)
    assert sorted(tiny.values()) == ["test", "train", "val"]
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(ids, 0, (1.0, -0.1, 0.1))


@pytest.fixture
def copied(tiny_prepared_dataset: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_prepared_dataset.parent, tmp_path / "ds")
    return tmp_path / "ds" / "manifest.csv"


def test_paths_are_relative_on_disk_and_absolute_on_load(copied: Path) -> None:
    raw = pd.read_csv(copied, dtype=str)
    assert not any(Path(p).is_absolute() for p in raw["ct"])
    m = Manifest.load(copied)  # the copy resolves against its own folder
    assert all(Path(p).is_absolute() and Path(p).is_file() and str(copied.parent) in p for p in m.frame["ap"])
    assert m.frame["label"].dtype.kind == "i"


def test_extra_latent_column_is_resolved(copied: Path) -> None:
    frame = pd.read_csv(copied, dtype=str)
    for sid in frame["subject_id"]:
        torch.save(torch.zeros(2, 4, 4, 4), copied.parent / f"{sid}_latent.pt")
    frame["latent"] = [f"{sid}_latent.pt" for sid in frame["subject_id"]]
    frame["note"] = "x"
    frame.to_csv(copied, index=False)
    m = Manifest.load(copied)
    assert all(Path(p).is_file() for p in m.frame["latent"]) and set(m.frame["note"]) == {"x"}


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda f: f.drop(columns=["lat"]), r"missing columns \['lat'\]"),
        (lambda f: f.assign(ct=["ct/none.nii.gz"] * len(f)), "column 'ct' lists 8 missing files"),
        (lambda f: pd.concat([f, f.iloc[:1]]), "duplicate subject ids"),
        (lambda f: f.assign(split=["train"] * (len(f) - 1) + ["holdout"]), "unknown split"),
        (lambda f: f.assign(label=["a"] * len(f)), "non-integers"),
        # outputs are named after the ids: a path in an id would write outside the output folder
        (lambda f: f.assign(subject_id=["../../evil"] + list(f["subject_id"][1:])), r"subject ids \['\.\./\.\./evil'\]"),
        (lambda f: f.assign(subject_id=["a/b"] + list(f["subject_id"][1:])), "expected plain names"),
    ],
)
def test_bad_manifest(copied: Path, edit, match: str) -> None:
    edit(pd.read_csv(copied, dtype=str)).to_csv(copied, index=False)
    with pytest.raises(ValueError, match=match) as info:
        Manifest.load(copied)
    assert str(copied) in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        Manifest.load(tmp_path / "manifest.csv")
