from pathlib import Path

import pytest
import torch

from dataset import CTDataModule, DatasetInfo, Manifest, PairedDataModule


def test_tiny_dataset_layout(tiny_prepared_dataset: Path) -> None:
    manifest = Manifest.load(tiny_prepared_dataset)
    assert len(manifest) == 8
    assert set(manifest.frame["split"]) == {"train", "val", "test"}
    assert sorted(manifest.frame["label"].unique()) == [0, 1]
    info = DatasetInfo.load(tiny_prepared_dataset.parent)
    assert info.shape == (32, 32, 32) and info.spacing == (8.0, 8.0, 8.0)
    assert info.geometry.detector_size == (32, 32)
    assert (info.window.hu_min, info.window.hu_max) == (-1000.0, 1000.0)


def test_ct_datamodule_patches_and_volumes(tiny_ct_datamodule: CTDataModule) -> None:
    batch = next(iter(tiny_ct_datamodule.train_dataloader()))
    assert batch["ct"].shape == (2, 1, 16, 16, 16) and batch["ct"].dtype == torch.float32
    assert batch["ct"].min() >= -1 and batch["ct"].max() <= 1
    assert len(batch["subject_id"]) == 2 and all(isinstance(s, str) for s in batch["subject_id"])
    loader = tiny_ct_datamodule.train_dataloader()
    assert len(loader.dataset) == 6 * 2 and len(loader) == 6  # 6 train subjects x 2 patches, batch 2
    val = next(iter(tiny_ct_datamodule.val_dataloader()))
    assert val["ct"].shape == (1, 1, 32, 32, 32)


def test_ct_datamodule_matches_paired_ct(tiny_prepared_dataset: Path) -> None:
    whole = CTDataModule(tiny_prepared_dataset, patch_size=None, batch_size=2)
    paired = PairedDataModule(tiny_prepared_dataset, batch_size=8, load=("ct",))
    paired.setup()
    ct = {sid: v for sid, v in zip(*(lambda b: (b["subject_id"], b["ct"]))(next(iter(paired.train_dataloader()))))}
    batch = next(iter(whole.train_dataloader()))
    assert batch["ct"].shape == (2, 1, 32, 32, 32)
    for sid, vol in zip(batch["subject_id"], batch["ct"]):
        assert torch.equal(vol, ct[sid])  # both loaders agree on layout and intensity


def test_ct_datamodule_uses_distributed_sampler(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        dm = CTDataModule(tiny_prepared_dataset, patch_size=8, samples_per_volume=1, queue_length=4)
        loader = dm.train_dataloader()
        assert isinstance(loader.dataset.subject_sampler, torch.utils.data.DistributedSampler)
        assert next(iter(loader))["ct"].shape == (2, 1, 8, 8, 8)
    finally:
        torch.distributed.destroy_process_group()


def test_paired_datamodule_batches(tiny_paired_datamodule: PairedDataModule) -> None:
    batch = next(iter(tiny_paired_datamodule.train_dataloader()))
    assert batch["ap"].shape == batch["lat"].shape == (2, 1, 32, 32)
    assert 0 <= batch["ap"].min() and batch["ap"].max() <= 1 and batch["ap"].max() > 0.05
    assert batch["ct"].shape == (2, 1, 32, 32, 32)
    assert batch["label"].dtype == torch.long and batch["label"].shape == (2,)
    assert len(batch["subject_id"]) == 2
    assert len(tiny_paired_datamodule.val_dataloader().dataset) == 1
    assert len(tiny_paired_datamodule.test_dataloader().dataset) == 1


def test_bad_datamodule_arguments(tiny_prepared_dataset: Path) -> None:
    with pytest.raises(ValueError, match="patch_size"):
        CTDataModule(tiny_prepared_dataset, patch_size=0)
    with pytest.raises(ValueError, match="exceeds the volume shape"):
        CTDataModule(tiny_prepared_dataset, patch_size=64).train_dataloader()
    with pytest.raises(ValueError, match="latent"):
        PairedDataModule(tiny_prepared_dataset).setup()  # default load asks for a latent column
