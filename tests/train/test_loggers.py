"""Logger presets: TensorBoard, CSV and W&B (offline, no network) compose into the run dir, and one tiny
BiFlowNet run logging to all three records the same scalars in each."""

from __future__ import annotations

import csv
import struct
import time
from pathlib import Path

import hydra
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from tests.train.test_train_BiFlowNet import write_proxy_latents
from train.train_BiFlowNet import run

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32768  # the .wandb file is a log of 32 KiB blocks of (crc32, length, kind) framed chunks


def _wandb_records(run_file: Path) -> list:
    """Records (``wandb_internal_pb2.Record``) of an offline W&B run file (``run-<id>.wandb``)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too short for a chunk header
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4) and pending:  # a full record, or the last piece of a split one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_file: Path, timeout: float = 60.0) -> list[dict[str, str]]:
    """History rows ({key: JSON value}) of a finished offline W&B run.

    W&B's service writes the file in the background after ``wandb.finish()`` returns, so this waits until
    the run's closing ``exit`` record is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any(r.WhichOneof("record_type") == "exit" for r in records), f"{run_file}: the run was never finished"
    return [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def scalar_keys(keys: set[str]) -> set[str]:
    """Logged metric names, without each logger's own bookkeeping columns."""
    return {k for k in keys if not k.startswith("_") and k not in ("epoch", "step", "trainer/global_step")}


@pytest.mark.parametrize("choice", ["tensorboard", "csv", "wandb", "many", "[tensorboard,csv,wandb]"])
def test_logger_presets_write_into_the_run_dir(choice: str, tmp_path: Path) -> None:
    with hydra.initialize_config_dir(str(ROOT / "config"), version_base="1.3"):
        cfg = hydra.compose("train_BiFlowNet", overrides=[f"logger={choice}", f"paths.output_dir={tmp_path}"])
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    kinds = {CSVLogger: "csv", TensorBoardLogger: "tensorboard", WandbLogger: "wandb"}
    assert {kinds[type(lg)] for lg in loggers} == set(cfg.logger)
    for lg, c in zip(loggers, cfg.logger.values()):
        assert c.save_dir == str(tmp_path)
        if isinstance(lg, WandbLogger):
            assert c.offline is True  # works without network by default; `wandb sync` uploads later


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


def test_one_run_logs_the_same_scalars_to_tensorboard_csv_and_wandb(
    tiny_prepared_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb_home",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache"}.items():
        monkeypatch.setenv(key, str(value))
    data = write_proxy_latents(tiny_prepared_dataset, tmp_path / "data")
    out = tmp_path / "run"
    overrides = ["experiment=biflownet_tiny", f"paths.data_dir={data}", f"paths.output_dir={out}",
                 "logger=[tensorboard,csv,wandb]", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
                 "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "network.xray.image_size=[32,32]"]
    with hydra.initialize_config_dir(str(ROOT / "config"), version_base="1.3"):
        cfg = hydra.compose("train_BiFlowNet", overrides=overrides)
    try:
        run(cfg)
    finally:
        wandb.finish()  # what the end of a `python -m train.train_BiFlowNet` process does

    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    csv_keys = scalar_keys(set(rows[0]))

    (events,) = list((out / "tensorboard").glob("events.out.tfevents*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tb_keys = scalar_keys(set(acc.Tags()["scalars"]))

    (run_file,) = list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # offline run dir inside the run dir
    history = wandb_history(run_file)
    wandb_keys = scalar_keys(set().union(*history))

    assert {"train/loss", "val/loss", "val/sample_mse"} <= csv_keys
    assert csv_keys == tb_keys == wandb_keys
    last_val = [float(r["val/loss"]) for r in rows if r["val/loss"]][-1]
    assert [e.value for e in acc.Scalars("val/loss")][-1] == pytest.approx(last_val, rel=1e-6)
    assert [float(h["val/loss"]) for h in history if "val/loss" in h][-1] == pytest.approx(last_val, rel=1e-6)


def test_autoencoder_mpr_image_reaches_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L
    import wandb

    from AutoEncoder import PatchVolumeModule
    from tests.AutoEncoder.conftest import tiny_config

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb_home",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache"}.items():
        monkeypatch.setenv(key, str(value))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    module = PatchVolumeModule(tiny_config(), loss={"perceptual_weight": 0.0, "gan_weight": 0.0})
    module.trainer = L.Trainer(logger=[logger], accelerator="cpu", enable_checkpointing=False)
    x = torch.rand(1, 16, 16, 16) * 2 - 1
    module._log_mpr(x, x)
    wandb.finish()
    images = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/val/mpr_input_vs_reconstruction*.png"))
    assert len(images) == 1
