"""cache_rate in CTDataModule and PairedDataModule: cached files are read at most once over epochs, loaders and
repeated setup calls; uncached ones are read again; the cached data equals the uncached data; bad rates raise."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torchio as tio

import dataset.paired_dataset as paired_dataset
from dataset import CTDataModule, Manifest, PairedDataModule


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


@pytest.fixture
def ct_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts TorchIO file reads per path."""
    reads: Counter = Counter()
    original = tio.Image.read_and_check

    def counting(self: tio.Image, path: Path):
        reads[str(path)] += 1
        return original(self, path)

    monkeypatch.setattr(tio.Image, "read_and_check", counting)
    return reads


@pytest.mark.parametrize("patch_size", [16, None])
@pytest.mark.parametrize("cache_rate", [1.0, 0.0])
def test_ct_datamodule_cache_reads_each_file_once(tiny_prepared_dataset: Path, ct_reads: Counter,
                                                  patch_size: int | None, cache_rate: float) -> None:
    dm = CTDataModule(tiny_prepared_dataset, patch_size=patch_size, samples_per_volume=1, queue_length=4,
                      batch_size=2, cache_rate=cache_rate)
    dm.setup("fit")
    dm.setup("validate")  # Lightning may call setup again
    seen = []
    for _ in range(2):  # two epochs of training and validation
        seen += [sid for batch in dm.train_dataloader() for sid in batch["subject_id"]]
        seen += [sid for batch in dm.val_dataloader() for sid in batch["subject_id"]]
    frame = Manifest.load(tiny_prepared_dataset).frame
    used = frame[frame["split"].isin(["train", "val"])]
    assert len(set(seen)) == len(used)
    if cache_rate == 1.0:
        assert set(ct_reads) == set(frame["ct"]) and max(ct_reads.values()) == 1  # every split cached at setup
    else:
        assert all(ct_reads[p] >= 2 for p in used["ct"])  # read again every epoch without the cache


def test_ct_cache_rate_caches_a_fraction_and_keeps_the_data(tiny_prepared_dataset: Path, ct_reads: Counter) -> None:
    dm = CTDataModule(tiny_prepared_dataset, patch_size=None, batch_size=1, cache_rate=0.5)
    dm.setup()
    train = Manifest.load(tiny_prepared_dataset).split("train")
    assert sorted(ct_reads) == sorted(train["ct"][:3])  # int(6 * 0.5) train subjects, none of the 1-subject splits
    plain = CTDataModule(tiny_prepared_dataset, patch_size=None, batch_size=1)
    plain.setup()
    for i in range(len(train)):
        a, b = dm.datasets["train"][i], plain.datasets["train"][i]
        assert a["subject_id"] == b["subject_id"] and torch.equal(a["ct"].data, b["ct"].data)
        assert torch.equal(torch.as_tensor(a["ct"].affine), torch.as_tensor(b["ct"].affine))


@pytest.mark.parametrize("cache_rate", [1.0, 0.0])
def test_paired_datamodule_cache_reads_each_file_once(tiny_prepared_dataset: Path, monkeypatch: pytest.MonkeyPatch,
                                                      cache_rate: float) -> None:
    reads: Counter = Counter()
    for name in ("read_radiograph", "read_ct"):
        original = getattr(paired_dataset, name)

        def counting(path, *args, _original=original, **kwargs):
            reads[str(path)] += 1
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(paired_dataset, name, counting)
    dm = PairedDataModule(tiny_prepared_dataset, batch_size=2, load=("ap", "lat", "ct"), cache_rate=cache_rate)
    dm.setup("fit")
    batches = [b for _ in range(2) for b in dm.train_dataloader()]
    dm.setup("validate")
    batches += [b for _ in range(2) for b in dm.val_dataloader()]
    assert all(b["ct"].shape[1:] == (1, 32, 32, 32) and b["ap"].shape[1:] == (1, 32, 32) for b in batches)
    frame = Manifest.load(tiny_prepared_dataset).frame
    files = [p for col in ("ap", "lat", "ct") for p in frame[col]]
    if cache_rate == 1.0:
        assert set(reads) == set(files) and max(reads.values()) == 1
    else:
        used = frame[frame["split"].isin(["train", "val"])]
        assert all(reads[p] >= 2 for col in ("ap", "lat", "ct") for p in used[col])


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_bad_cache_rate_raises(tiny_prepared_dataset: Path, rate: float) -> None:
    with pytest.raises(ValueError, match="cache_rate"):
        CTDataModule(tiny_prepared_dataset, cache_rate=rate)
    with pytest.raises(ValueError, match="cache_rate"):
        PairedDataModule(tiny_prepared_dataset, cache_rate=rate)
