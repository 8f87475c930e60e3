"""train.train_PatchVolume end to end on the tiny prepared dataset: config composition, a few steps, resume,
stage 2, bad input, and a 2-process torchrun (gloo) run whose codebooks stay identical across ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig

from AutoEncoder import load_autoencoder
from train.train_PatchVolume import run

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "config")
ROOT = Path(__file__).resolve().parents[2]


def _compose(overrides: list[str]) -> DictConfig:
    with hydra.initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra.compose("train_PatchVolume", overrides=overrides)


def _overrides(manifest: Path, out: Path, steps: int) -> list[str]:
    return [
        "experiment=ae_tiny", f"paths.data_dir={manifest.parent}", f"paths.output_dir={out}",
        f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "callbacks.checkpoint.every_n_train_steps=2", "loss.discriminator_iter_start=1",
        "data.samples_per_volume=2", "data.queue_length=4",
    ]


@pytest.mark.parametrize("experiment", ["ae_tiny", "ae_4x_stage1", "ae_8x_stage1", "ae_8x_stage2", "ae_4x_stage2"])
def test_experiments_compose(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}", "resume_from_checkpoint=x.ckpt"])
    assert cfg.module.autoencoder.channels and cfg.stage in (1, 2)
    if "stage2" in experiment:
        assert cfg.data.patch_size is None and cfg.module.stage1_checkpoint == "x.ckpt"


def test_train_writes_checkpoint_and_resumes(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run(_compose(_overrides(tiny_prepared_dataset, out, 3)))
    last = Path(first["last_checkpoint"])
    assert last.is_file() and first["iteration"] >= 2
    assert "val/psnr" in first["metrics"] and first["metrics"]["val/psnr"] > 0
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["dataset_info"]["window"]  # intensity window carried into the checkpoint
    assert bool(ckpt["state_dict"]["autoencoder.quantizer.initialised"])
    loaded = load_autoencoder(last)
    assert loaded.model.downsample_factor == 4 and loaded.dataset_info is not None
    assert (out / "config.yaml").is_file() and not (out / ".hydra").exists()  # the resolved config of the run
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))

    second = run(_compose(_overrides(tiny_prepared_dataset, out, 6)))  # ckpt_path=last resumes
    # max_steps counts G and D optimiser steps; an iteration is not cut in half, so it may end one step past
    assert second["global_step"] in (6, 7) and second["iteration"] > first["iteration"]

    # stage 2 from the stage-1 checkpoint: whole volumes, frozen encoder + codebook
    stage2 = run(_compose(_overrides(tiny_prepared_dataset, tmp_path / "s2", 2)
                          + ["stage=2", f"resume_from_checkpoint={last}", "data.patch_size=null", "data.batch_size=1"]))
    s2 = load_autoencoder(stage2["last_checkpoint"]).model
    s1 = load_autoencoder(last).model.state_dict()
    assert stage2["iteration"] >= 1
    for name, value in s2.state_dict().items():
        if name.startswith(("encoder.", "quantizer.")):
            assert torch.equal(value, s1[name]), name
    assert any(not torch.equal(v, s1[k]) for k, v in s2.state_dict().items() if k.startswith("decoder."))


def test_bad_input_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "train.train_PatchVolume", "experiment=ae_tiny", f"paths.data_dir={tmp_path}",
         f"paths.output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=120,
    )
    assert proc.returncode == 2
    assert "manifest.csv" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # ~20 s; still part of `make test` (the marker only documents the cost)
def test_torchrun_ddp_two_processes_keeps_codebooks_identical(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "train.train_PatchVolume", "trainer=ddp_cpu", *_overrides(tiny_prepared_dataset, out, 4),
        "logger=none", "+callbacks.dump._target_=tests.train.codebook_dump.CodebookDump", f"+callbacks.dump.out_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    r0, r1 = (torch.load(out / f"codebook_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert bool(r0["initialised"])
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key


def test_stage2_has_its_own_run_folder_and_a_stage_mismatch_is_refused(tiny_prepared_dataset: Path,
                                                                        tmp_path: Path) -> None:
    s1 = _compose(["experiment=ae_tiny"])
    s2 = _compose(["experiment=ae_tiny", "stage=2", "resume_from_checkpoint=x.ckpt"])
    assert s1.run_name == "ae_tiny_stage1" and s2.run_name == "ae_tiny_stage2"
    assert s1.paths.output_dir != s2.paths.output_dir
    out = tmp_path / "run"
    first = run(_compose(_overrides(tiny_prepared_dataset, out, 1)))
    # stage 2 pointed at the stage-1 run folder (what a shared run_name used to do) is refused in one line
    with pytest.raises(ValueError, match=r"it was trained with stage=1, this run has stage=2; give this run its own "
                                         r"run_name=\.\.\. .*ckpt_path=null") as e:
        run(_compose(_overrides(tiny_prepared_dataset, out, 2) + ["stage=2", f"resume_from_checkpoint={first['last_checkpoint']}",
                                                                   "data.patch_size=null", "data.batch_size=1"]))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="stage 1 would ignore it"):
        run(_compose(_overrides(tiny_prepared_dataset, out, 2) + [f"resume_from_checkpoint={first['last_checkpoint']}"]))
