"""train.train_BiFlowNet: composed configs train, checkpoint, resume (1 process and 2-process torchrun), bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dataset.dataset_info import DatasetInfo
from dataset.manifest import Manifest
from dataset.paired_dataset import PairedDataset
from ddpm import load_biflownet, parallel_projection_grids
from train.train_BiFlowNet import run

ROOT = Path(__file__).resolve().parents[2]


def write_proxy_latents(manifest: Path, out_dir: Path, channels: int = 4, factor: int = 4) -> Path:
    """Copy a prepared dataset and add CT-derived stand-in latents (C, D/f, H/f, W/f) + latent_stats.json.

    Channels: local mean, local max, local min and local spread of the [-1, 1] CT, so the latents carry
    the anatomy the X-rays show (like an autoencoder latent would).
    """
    shutil.copytree(manifest.parent, out_dir)
    m = Manifest.load(out_dir / "manifest.csv")
    ds = PairedDataset(m.frame, load=("ct",))
    paths, all_z = [], []
    (out_dir / "latent").mkdir()
    for i in range(len(ds)):
        ct = ds[i]["ct"][None]  # (1, 1, D, H, W)
        mean = F.avg_pool3d(ct, factor)
        feats = [mean, F.max_pool3d(ct, factor), -F.max_pool3d(-ct, factor), (F.avg_pool3d(ct**2, factor) - mean**2).sqrt()]
        z = torch.cat(feats[:channels], dim=1)[0]
        p = out_dir / "latent" / f"{ds[i]['subject_id']}.pt"
        torch.save(z.clone(), p)
        paths.append(str(p))
        all_z.append(z)
    frame = m.frame.copy()
    frame["latent"] = paths
    Manifest.write(frame, out_dir / "manifest.csv")
    stack = torch.stack(all_z)
    stats = {"mean": stack.mean(dim=(0, 2, 3, 4)).tolist(), "std": stack.std(dim=(0, 2, 3, 4)).tolist()}
    (out_dir / "latent_stats.json").write_text(json.dumps(stats))
    return out_dir


@pytest.fixture(scope="session")
def latent_dataset(tiny_prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a prepared dataset whose manifest has a `latent` column (4 x 8^3 per subject)."""
    return write_proxy_latents(tiny_prepared_dataset, tmp_path_factory.mktemp("latents") / "data")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


def _overrides(data: Path, runs: Path, steps: int) -> list[str]:
    return [
        "experiment=biflownet_tiny",
        f"paths.data_dir={data}",
        f"paths.log_dir={runs}",
        "logger=none",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.checkpoint.every_n_train_steps=2",
        "network.xray.image_size=[32,32]",
    ]


def _compose(overrides: list[str]):
    with hydra.initialize_config_dir(str(ROOT / "config"), version_base="1.3"):
        return hydra.compose("train_BiFlowNet", overrides=overrides)


def test_run_trains_writes_checkpoint_and_resumes(latent_dataset: Path, tmp_path: Path) -> None:
    out = run(_compose(_overrides(latent_dataset, tmp_path, steps=2)))
    assert out["global_step"] == 2 and Path(out["last_checkpoint"]).is_file()
    assert "val/loss" in out["metrics"]
    first = load_biflownet(out["last_checkpoint"])
    assert first.conditioning["step"] == 2 and first.conditioning["xray_size"] == [32, 32]
    # the real cone-beam grids from dataset.json replaced the parallel-beam default
    parallel_ap, parallel_lat = parallel_projection_grids((8, 8, 8))
    assert not torch.allclose(first.model.xray.grid_ap, parallel_ap, atol=1e-3)
    assert not torch.allclose(first.model.xray.grid_lat, parallel_lat, atol=1e-3)
    # ... and the checkpoint carries the training geometry and latent voxel spacing (32^3 CT at 8 mm -> 8^3 latent)
    info = DatasetInfo.load(latent_dataset)
    assert first.geometry == info.geometry and first.model.xray.latent_spacing == (32.0, 32.0, 32.0)
    torch.testing.assert_close(first.model.xray.grid_ap, info.geometry.sample_grid("AP", (8, 8, 8), (32.0,) * 3))
    # the training X-rays' intensity statistics travel with the checkpoint (generate_ct --harmonize auto)
    from dataset import IntensityReference

    stats = IntensityReference.from_dict(first.hparams["xray_stats"])
    assert stats == IntensityReference.from_manifest(latent_dataset / "manifest.csv")
    assert _compose(_overrides(latent_dataset, tmp_path, steps=2)).data.xray_augment.enabled  # on by default
    out2 = run(_compose(_overrides(latent_dataset, tmp_path, steps=4)))  # ckpt_path=last -> resume
    assert out2["global_step"] == 4
    second = torch.load(out2["last_checkpoint"], weights_only=True)
    assert int(second["state_dict"]["ema_updates"]) == 4


@pytest.mark.slow
def test_torchrun_two_cpu_processes_checkpoint_and_resume(latent_dataset: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def launch(steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "train.train_BiFlowNet", "trainer=ddp_cpu", *_overrides(latent_dataset, tmp_path, steps)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)

    proc = launch(2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "train_BiFlowNet" / "tiny" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    proc = launch(4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4 and int(ckpt["state_dict"]["ema_updates"]) == 4


def test_manifest_without_latents_is_rejected(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_prepared_dataset.parent, data)
    with pytest.raises(ValueError, match="no 'latent' column"):
        run(_compose(_overrides(data, tmp_path, steps=1)))


@pytest.mark.parametrize(
    "override,match",
    [
        ("network.latent_shape=[16,16,16]", r"latent has shape \(4, 8, 8, 8\), but the network config expects \(4, 16, 16, 16\)"),
        ("network.in_channels=8", "network config expects"),
        ("network.xray.image_size=[64,64]", r"X-ray is \(32, 32\), but network.xray.image_size is \(64, 64\)"),
        ("global_batch_size=3 trainer.devices=2", "not divisible by the world size 2"),
        ("network.grad_checkpointing=sometimes", "network.grad_checkpointing='sometimes'; expected true, false or auto"),
        ("process.loss_weighting=p2", "loss_weighting='p2', expected one of"),
        ("process.min_snr_gamma=0", "min_snr_gamma=0, expected a finite number > 0"),
        ("process.timestep_bias=1.5", r"timestep_bias=1.5, expected a number in \[0, 1\]"),
    ],
)
def test_bad_configuration_against_the_data_is_rejected(latent_dataset: Path, tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run(_compose([*_overrides(latent_dataset, tmp_path, steps=1), *override.split()]))


def test_min_snr_loss_weighting_trains_and_travels_with_the_checkpoint(latent_dataset: Path, tmp_path: Path) -> None:
    out = run(_compose([*_overrides(latent_dataset, tmp_path, steps=2), "process.loss_weighting=min_snr",
                        "process.min_snr_gamma=2"]))
    diffusion = load_biflownet(out["last_checkpoint"]).diffusion
    assert (diffusion.loss_weighting, diffusion.min_snr_gamma) == ("min_snr", 2.0)
    assert torch.isfinite(torch.tensor(out["metrics"]["val/loss"]))


def test_cli_turns_bad_input_into_exit_code_2(latent_dataset: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "train.train_BiFlowNet", *_overrides(latent_dataset, tmp_path, 1), "network.latent_shape=[16,16,16]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 2
    assert "train_BiFlowNet: error:" in proc.stderr and "latent has shape" in proc.stderr
    assert len(pd.read_csv(latent_dataset / "manifest.csv")) == 8


def test_rerun_on_other_data_or_network_is_refused_naming_run_name(latent_dataset: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run(_compose(_overrides(latent_dataset, runs, steps=1)))
    other = tmp_path / "other"
    shutil.copytree(latent_dataset, other)
    frame = pd.read_csv(other / "manifest.csv", dtype=str, keep_default_na=False)
    frame.loc[frame.index[frame["split"] == "train"][0], "split"] = "val"
    frame.to_csv(other / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=r"cannot resume: it was trained on .*data/manifest.csv \(6 training subjects\), "
                                         r"this run reads .*other/manifest.csv \(5\).*run_name=\.\.\. \(now tiny\), "
                                         r"or start fresh with ckpt_path=null"):
        run(_compose(_overrides(other, runs, steps=2)))
    with pytest.raises(ValueError, match=r"its network differs from this run's \(model_channels: 16 there, 8 here\)"):
        run(_compose([*_overrides(latent_dataset, runs, steps=2), "network.model_channels=8"]))
    # another training objective is another run; sampler settings are not
    with pytest.raises(ValueError, match=r"its diffusion differs from this run's \(timestep_bias: 0.0 there, 1.0 here\)"):
        run(_compose([*_overrides(latent_dataset, runs, steps=2), "process.timestep_bias=1.0"]))
    with pytest.raises(ValueError, match=r"its diffusion differs from this run's \(target: 'v' there, 'eps' here\)"):
        run(_compose([*_overrides(latent_dataset, runs, steps=2), "process.target=eps"]))
    resumed = run(_compose([*_overrides(latent_dataset, runs, steps=2), "process.num_inference_steps=7"]))
    assert resumed["global_step"] == 2
    fresh = run(_compose([*_overrides(other, runs, steps=1), "ckpt_path=null"]))  # what the message offers
    assert fresh["global_step"] == 1


def test_fewer_training_subjects_than_the_batch_lowers_it_with_a_warning(capsys: pytest.CaptureFixture) -> None:
    from train.train_BiFlowNet import per_rank_batch

    assert per_rank_batch(8, 1, 10, True, "m.csv") == 8
    assert per_rank_batch(8, 2, 10, True, "m.csv") == 4
    assert capsys.readouterr().err == ""
    assert per_rank_batch(8, 1, 3, True, "m.csv") == 3  # 3 subjects, batch 8: no full batch with drop_last
    err = capsys.readouterr().err
    assert "3 training subjects" in err and "global_batch_size=8 on 1 rank(s)" in err and "batch 3 per rank" in err
    assert per_rank_batch(8, 2, 5, True, "m.csv") == 2  # 5 subjects over 2 ranks: 2 each
    assert per_rank_batch(8, 1, 3, False, "m.csv") == 8  # without drop_last the short batch is kept
    with pytest.raises(ValueError, match="m.csv: 1 training subjects for 2 ranks"):
        per_rank_batch(8, 2, 1, True, "m.csv")
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        per_rank_batch(3, 2, 10, True, "m.csv")


@pytest.mark.parametrize("memory_gb, recompute", [(64.0, False), (0.001, True)])
def test_auto_grad_checkpointing_is_decided_by_the_counted_step(latent_dataset: Path, tmp_path: Path, memory_gb: float,
                                                                recompute: bool, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """`auto` counts the step and recomputes only when it does not fit the device; the run trains with the decided
    bool, prints what it chose, and the checkpoint carries the bool (generation never sees `auto`)."""
    import ddpm.memory

    monkeypatch.setattr(ddpm.memory, "device_memory", lambda accelerator: (int(memory_gb * 1e9), "test device"))
    seen = []
    monkeypatch.setattr(ddpm.memory, "resolve_grad_checkpointing",
                        lambda *a, _f=ddpm.memory.resolve_grad_checkpointing: seen.append(_f(*a)) or seen[-1])
    out = run(_compose([*_overrides(latent_dataset, tmp_path, steps=1), "network.grad_checkpointing=auto"]))
    printed = capsys.readouterr().out
    assert seen and seen[0][0] is recompute and seen[0][1] > 0
    assert f"network.grad_checkpointing=auto: a training step without recompute needs" in printed
    assert f"test device: recompute {'on' if recompute else 'off'}" in printed
    loaded = load_biflownet(out["last_checkpoint"])
    assert loaded.hparams["network"]["grad_checkpointing"] is recompute
