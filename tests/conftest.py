"""Shared fixtures: a tiny prepared dataset built with the real ``dataset.prepare`` code path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataset import CTDataModule, PairedDataModule, chest_phantom, write_nifti
from dataset.prepare import main as prepare_main

TINY_SUBJECTS = 8
TINY_SIZE = 32


@pytest.fixture(scope="session")
def tiny_prepared_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of ``manifest.csv`` of a prepared dataset: 8 phantom subjects, 32^3 CT, 32^2 DRRs.

    Splits: 6 train, 1 val, 1 test (seed 0). Labels: 1 = enlarged heart, 0 = normal (alternating).
    ``dataset.json`` sits next to the manifest (window [-1000, 1000], spacing 8 mm). Read-only: copy it
    before changing anything.
    """
    root = tmp_path_factory.mktemp("tiny_dataset")
    raw = root / "raw"
    raw.mkdir()
    lines = ["subject_id,label"]
    for i in range(TINY_SUBJECTS):
        sid = f"phantom{i:02d}"
        large = i % 2 == 1
        # a slightly different grid than the target, so resampling and crop/pad are exercised
        write_nifti(chest_phantom((36, 34, 34), (7.5, 7.5, 7.5), seed=i, large_heart=large), raw / f"{sid}.nii.gz")
        lines.append(f"{sid},{int(large)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    out = root / "prepared"
    code = prepare_main(["--input", str(raw), "--out", str(out), "--size", str(TINY_SIZE), "--spacing", "8",
                         "--drr-size", str(TINY_SIZE), "--labels", str(root / "labels.csv"), "--no-progress"])
    assert code == 0, "tiny dataset preparation failed"
    return out / "manifest.csv"


@pytest.fixture
def tiny_ct_datamodule(tiny_prepared_dataset: Path) -> CTDataModule:
    """CTDataModule over the tiny dataset: 16^3 training patches, batch 2, whole 32^3 volumes for val."""
    dm = CTDataModule(tiny_prepared_dataset, patch_size=16, samples_per_volume=2, queue_length=8, batch_size=2)
    dm.setup("fit")
    return dm


@pytest.fixture
def tiny_paired_datamodule(tiny_prepared_dataset: Path) -> PairedDataModule:
    """PairedDataModule over the tiny dataset loading AP, LAT and CT, batch 2."""
    dm = PairedDataModule(tiny_prepared_dataset, batch_size=2, load=("ap", "lat", "ct"))
    dm.setup("fit")
    return dm


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: tiny CPU kernels are fastest single-threaded on a shared, busy
    machine (no OpenMP spin-waits); the previous thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
