"""train.generate_training_latent on the tiny prepared dataset: latents, manifest column, statistics, resume,
torchrun sharding, and bad input (missing manifest, non-autoencoder checkpoint) -> exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from AutoEncoder import PatchVolumeModule, load_autoencoder
from dataset import DatasetInfo
from dataset.ct_datamodule import CTDataModule
from dataset.latents import LatentStats, read_latent, write_latent
from ddpm.preflight import check_training_inputs
from train.generate_training_latent import generate, main

ROOT = Path(__file__).resolve().parents[2]
TINY_AE = {"in_channels": 1, "channels": [8, 8, 8], "embedding_dim": 4, "n_codes": 16, "num_groups": 4, "patch_size": 16}


@pytest.fixture(scope="module")
def ae_checkpoint(tiny_prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained tiny autoencoder checkpoint carrying the dataset's description."""
    torch.manual_seed(0)
    info = DatasetInfo.load(tiny_prepared_dataset.parent).to_dict()
    module = PatchVolumeModule(TINY_AE, loss={"perceptual_weight": 0.0, "gan_weight": 0.0}, dataset_info=info)
    dm = CTDataModule(tiny_prepared_dataset, patch_size=16, samples_per_volume=1, queue_length=4, batch_size=2)
    out = tmp_path_factory.mktemp("ae")
    trainer = L.Trainer(default_root_dir=out, accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(out / "ae.ckpt")
    return out / "ae.ckpt"


def _copy(manifest: Path, tmp_path: Path) -> Path:
    shutil.copytree(manifest.parent, tmp_path / "data")
    return tmp_path / "data" / "manifest.csv"


def test_generates_latents_stats_and_manifest(tiny_prepared_dataset: Path, ae_checkpoint: Path, tmp_path: Path) -> None:
    manifest = _copy(tiny_prepared_dataset, tmp_path)
    result = generate(manifest, ae_checkpoint, chunk_size=1, progress=False)
    frame = pd.read_csv(manifest)
    assert result["encoded"] == len(frame) == 8
    assert all(not Path(p).is_absolute() for p in frame["latent"])
    model = load_autoencoder(ae_checkpoint).model
    sid = frame["subject_id"][0]
    z, fingerprint = read_latent(manifest.parent / frame["latent"][0])
    assert fingerprint == load_autoencoder(ae_checkpoint).fingerprint
    assert z.shape == (4, 8, 8, 8) and z.dtype == torch.float32
    # the stored latent is the autoencoder's encoding of the dataset's [-1, 1] volume
    dm = CTDataModule(manifest, patch_size=None, batch_size=1)
    dm.setup()
    subject = [s for s in dm.datasets[frame["split"][0]] if s["subject_id"] == sid][0]
    x = dm.collate([subject])["ct"]
    with torch.no_grad():  # fp32: oneDNN may pick other conv algorithms per call (~2e-5); a wrong latent is O(0.1) off
        torch.testing.assert_close(z, model.encode(x)[0], atol=1e-4, rtol=1e-4)
    stats = json.loads((manifest.parent / "latent_stats.json").read_text())
    train = [read_latent(manifest.parent / p)[0] for p, s in zip(frame["latent"], frame["split"]) if s == "train"]
    allz = torch.stack(train).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(torch.tensor(stats["mean"]), allz.mean(1).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(stats["std"]), allz.std(1, unbiased=False).float(), atol=1e-4, rtol=1e-4)
    # resumable: a second run keeps every existing latent
    again = generate(manifest, ae_checkpoint, progress=False)
    assert again["encoded"] == 0 and again["skipped"] == 8


def test_bad_input_exits_2(tiny_prepared_dataset: Path, ae_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--manifest", str(tmp_path / "missing.csv"), "--ae-ckpt", str(ae_checkpoint), "--no-progress"]) == 2
    assert "missing.csv" in capsys.readouterr().err
    manifest = _copy(tiny_prepared_dataset, tmp_path)
    not_ae = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"network": {}}}, not_ae)
    assert main(["--manifest", str(manifest), "--ae-ckpt", str(not_ae), "--no-progress"]) == 2
    assert "other.ckpt: not a checkpoint of this project" in capsys.readouterr().err
    # an autoencoder trained on another intensity window does not match this dataset
    ckpt = torch.load(ae_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["dataset_info"]["window"] = {"hu_min": -500.0, "hu_max": 500.0}
    torch.save(ckpt, tmp_path / "other_window.ckpt")
    assert main(["--manifest", str(manifest), "--ae-ckpt", str(tmp_path / "other_window.ckpt"), "--no-progress"]) == 2
    assert "HU window" in capsys.readouterr().err


@pytest.mark.slow  # ~15 s; still part of `make test`
def test_torchrun_two_ranks_shard_the_subjects(tiny_prepared_dataset: Path, ae_checkpoint: Path, tmp_path: Path) -> None:
    manifest = _copy(tiny_prepared_dataset, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train.generate_training_latent", "--manifest", str(manifest), "--ae-ckpt", str(ae_checkpoint), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 encoded" in proc.stdout  # rank 0 did its half
    frame = pd.read_csv(manifest)
    assert all((manifest.parent / p).is_file() for p in frame["latent"])
    single = _copy(tiny_prepared_dataset, tmp_path / "single")
    generate(single, ae_checkpoint, progress=False)
    ddp_stats = json.loads((manifest.parent / "latent_stats.json").read_text())
    one_stats = json.loads((single.parent / "latent_stats.json").read_text())
    assert ddp_stats["mean"] == pytest.approx(one_stats["mean"], abs=1e-5)


def _other_autoencoder(ae_checkpoint: Path, tmp_path: Path) -> Path:
    """The same autoencoder with one decoder weight changed: another latent space as far as latents know."""
    ckpt = torch.load(ae_checkpoint, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("autoencoder.encoder."))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 0.05
    torch.save(ckpt, tmp_path / "other_ae.ckpt")
    return tmp_path / "other_ae.ckpt"


def test_latents_of_another_autoencoder_are_re_encoded(tiny_prepared_dataset: Path, ae_checkpoint: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = _copy(tiny_prepared_dataset, tmp_path)
    first = generate(manifest, ae_checkpoint, progress=False)
    other = _other_autoencoder(ae_checkpoint, tmp_path)
    fp_other = load_autoencoder(other).fingerprint
    assert main(["--manifest", str(manifest), "--ae-ckpt", str(other), "--no-progress"]) == 0
    assert "8 encoded (8 of them replaced latents of another autoencoder or damaged files), 0 kept" in capsys.readouterr().out
    frame = pd.read_csv(manifest)
    for p in frame["latent"]:
        assert read_latent(manifest.parent / p)[1] == fp_other
    stats = LatentStats.load(manifest.parent / "latent_stats.json")
    assert stats.ae_fingerprint == fp_other and stats.ae_checkpoint == str(other.resolve())
    assert stats.mean != tuple(first["stats"]["mean"])  # statistics of the new latents, not the old ones

    # a latent of the first autoencoder slipped back in is caught before training
    z, _ = read_latent(manifest.parent / frame["latent"][0])
    write_latent(z, manifest.parent / frame["latent"][0], load_autoencoder(ae_checkpoint).fingerprint)
    with pytest.raises(ValueError, match="latent made by autoencoder .* rerun python -m train.generate_training_latent"):
        check_training_inputs(manifest, 4, (8, 8, 8), None, stats, manifest.parent / "latent_stats.json")

    # deleting latents/ by hand leaves a manifest that simply regenerates them
    shutil.rmtree(manifest.parent / "latents")
    with pytest.raises(FileNotFoundError, match="8 of 8 latent files are missing .* regenerate them"):
        check_training_inputs(manifest, 4, (8, 8, 8), None, stats)
    again = generate(manifest, other, progress=False)
    assert again["encoded"] == 8 and again["stale"] == 0
    check_training_inputs(manifest, 4, (8, 8, 8), None, LatentStats.load(manifest.parent / "latent_stats.json"))
