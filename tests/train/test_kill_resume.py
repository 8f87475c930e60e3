"""A training run killed (SIGKILL) after a checkpoint and resumed ends exactly where an uninterrupted run ends,
for both entry points; a checkpoint write that fails never replaces the last good checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch

from dataset.checkpoint import read_checkpoint
from tests.train.test_train_BiFlowNet import latent_dataset  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _compose(config: str, overrides: list[str]):
    with hydra.initialize_config_dir(str(ROOT / "config"), version_base="1.3"):
        return hydra.compose(config, overrides=overrides)


def _step(path: Path) -> int:
    try:
        return int(read_checkpoint(path, mmap=True).get("global_step", -1))
    except (ValueError, OSError):
        return -1


def _kill_after_checkpoint(module: str, overrides: list[str], last: Path, step: int, timeout: float = 240) -> int:
    """Start ``python -m module`` with ``overrides``, SIGKILL it once ``last`` holds ``step`` or later; return that step.

    The run is stopped (SIGSTOP) while each checkpoint is read, so it is killed at the first checkpoint seen at or
    after ``step``, however fast the machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{module} ended (code {proc.returncode}) before it was killed: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            if last.is_file():
                # freeze the run while its checkpoint is read: on a fast machine it would otherwise write the
                # next one (or finish the test's range) during the read
                proc.send_signal(signal.SIGSTOP)
                if _step(last) >= step:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)
                    return _step(last)
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        raise AssertionError(f"{module} wrote no checkpoint of step {step} within {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_biflownet_killed_and_resumed_equals_uninterrupted(latent_dataset: Path, tmp_path: Path) -> None:
    from train.train_BiFlowNet import run

    # 6 training subjects, batch 2: an epoch is 3 steps; checkpoints (and validation) at every epoch end
    common = ["experiment=biflownet_tiny", f"paths.data_dir={latent_dataset}", "logger=none", "trainer.val_check_interval=3",
              "trainer.limit_val_batches=1", "callbacks.checkpoint.every_n_train_steps=3", "network.xray.image_size=[32,32]",
              "trainer.enable_progress_bar=false", "threads=1"]  # one thread in every run: the same float order
    reference = run(_compose("train_BiFlowNet", [*common, f"paths.output_dir={tmp_path / 'ref'}", "trainer.max_steps=6"]))
    out = tmp_path / "killed"
    killed_at = _kill_after_checkpoint("train.train_BiFlowNet", [*common, f"paths.output_dir={out}", "trainer.max_steps=1000"],
                                       out / "checkpoints" / "last.ckpt", 3)
    assert 3 <= killed_at < 6
    resumed = run(_compose("train_BiFlowNet", [*common, f"paths.output_dir={out}", "trainer.max_steps=6"]))
    assert resumed["global_step"] == reference["global_step"] == 6
    _assert_same_weights(Path(reference["last_checkpoint"]), Path(resumed["last_checkpoint"]))
    assert resumed["metrics"]["val/loss"] == pytest.approx(reference["metrics"]["val/loss"], rel=1e-5)


@pytest.mark.slow
def test_autoencoder_killed_and_resumed_equals_uninterrupted(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    from train.train_PatchVolume import run

    # 6 training subjects, one 16^3 patch each, batch 2 (no GAN: one optimiser step per batch): an epoch is 3 steps
    common = ["experiment=ae_tiny", f"paths.data_dir={tiny_prepared_dataset.parent}", "logger=none",
              "loss.gan_weight=0", "data.samples_per_volume=1", "data.queue_length=4", "trainer.val_check_interval=3",
              "trainer.limit_val_batches=1", "callbacks.checkpoint.every_n_train_steps=3", "trainer.enable_progress_bar=false",
              "threads=1"]  # one thread in every run: the same float order
    reference = run(_compose("train_PatchVolume", [*common, f"paths.output_dir={tmp_path / 'ref'}", "trainer.max_steps=6"]))
    out = tmp_path / "killed"
    killed_at = _kill_after_checkpoint("train.train_PatchVolume", [*common, f"paths.output_dir={out}", "trainer.max_steps=1000"],
                                       out / "checkpoints" / "last.ckpt", 3)
    assert 3 <= killed_at < 6
    resumed = run(_compose("train_PatchVolume", [*common, f"paths.output_dir={out}", "trainer.max_steps=6"]))
    assert resumed["global_step"] == reference["global_step"] == 6
    _assert_same_weights(Path(reference["last_checkpoint"]), Path(resumed["last_checkpoint"]))
    assert resumed["metrics"]["val/psnr"] == pytest.approx(reference["metrics"]["val/psnr"], rel=1e-5)


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import train.common as common

    io = common.AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    kept = torch.load(target, weights_only=True)
    assert kept["global_step"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


@pytest.mark.slow
def test_a_process_killed_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    code = f"""
import time, torch, train.common as common
io = common.AtomicCheckpointIO()
io.save_checkpoint({{"global_step": 1}}, {str(target)!r})
def slow_save(obj, f):
    f.write(b"PK\\x03\\x04 the first bytes")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
common.torch.save = slow_save
io.save_checkpoint({{"global_step": 2}}, {str(target)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert torch.load(target, weights_only=True)["global_step"] == 1
    # the next write removes what the killed writer left
    from train.common import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
