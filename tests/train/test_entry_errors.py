"""Both Hydra entry points end bad input with exit code 2, one stderr line naming the problem, no traceback,
and no run folder left behind (real subprocesses: what a user sees)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_train_BiFlowNet import latent_dataset  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "random.ckpt").write_bytes(bytes(range(256)) * 8)
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "good.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "good.ckpt").read_bytes()[:600])
    return {"random": tmp_path / "random.ckpt", "truncated": tmp_path / "truncated.ckpt"}


@pytest.mark.slow
@pytest.mark.parametrize("entry, overrides, needles", [
    ("train_BiFlowNet", ["experiment=biflownet_lora", "init_from={random}"], ["random.ckpt: not a checkpoint"]),
    ("train_BiFlowNet", ["experiment=biflownet_tiny", "foo=1"], ["Could not override 'foo'", "+foo=1"]),
    ("train_PatchVolume", ["experiment=ae_tiny", "ckpt_path={truncated}"], ["truncated.ckpt: truncated or damaged"]),
    ("train_PatchVolume", ["experiment=ae_tiny", "loss.perceptual_weight=1", "loss.perceptual.weights_path={missing}"],
     ["MedicalNet weights not found", "loss.perceptual.weights_path=", "loss.perceptual_weight=0"]),
])
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_folder(entry, overrides, needles, latent_dataset,
                                                               tmp_path: Path) -> None:
    files = {**_bad_files(tmp_path), "missing": tmp_path / "none.pth"}
    out = tmp_path / "run"
    args = [o.format(**files) for o in overrides]
    cmd = [sys.executable, "-m", f"train.{entry}", *args, f"paths.data_dir={latent_dataset}",
           f"paths.output_dir={out}", "logger=none", "trainer.max_steps=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith(f"python -m train.{entry}: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()

