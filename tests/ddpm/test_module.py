"""BiFlowNetModule: training step, EMA, checkpoint save/load/resume, non-finite loss, load_biflownet."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from ddpm import BiFlowNetModule, NonFiniteLossError, load_biflownet
from tests.ddpm.conftest import tiny_network

DIFFUSION = {"process": "ddpm", "target": "v", "num_train_timesteps": 100, "sampler": "ddim", "num_inference_steps": 3}


class _Latents(Dataset):
    """Synthetic paired items; item `nan_from` onwards has a NaN latent."""

    def __init__(self, n: int, nan_from: int | None = None) -> None:
        self.n, self.nan_from = n, nan_from

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        z = torch.randn(4, 8, 8, 8, generator=g) * 2 + 1
        if self.nan_from is not None and i >= self.nan_from:
            z[0, 0, 0, 0] = float("nan")
        return {"latent": z, "ap": torch.rand(1, 16, 16, generator=g), "lat": torch.rand(1, 16, 16, generator=g),
                "label": torch.tensor(i % 2), "subject_id": f"s{i}"}


def _module(**kw) -> BiFlowNetModule:
    return BiFlowNetModule(
        network=tiny_network(cross_attention="footprint", back_projection=True),
        diffusion=DIFFUSION,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        latent_stats={"mean": 1.0, "std": [2.0, 2.0, 2.0, 2.0]},
        ema_decay=0.9,
        val_timesteps=[10, 90],
        val_sample_steps=2,
        **kw,
    )


def _trainer(tmp: Path, max_steps: int, **kw) -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    return L.Trainer(default_root_dir=tmp, accelerator="cpu", max_steps=max_steps, logger=False, callbacks=[ckpt],
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     gradient_clip_val=1.0, **kw)


def test_train_save_load_resume_keeps_ema_and_step(tmp_path: Path) -> None:
    module = _module()
    loader = lambda: DataLoader(_Latents(4), batch_size=2)  # noqa: E731
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=1, val_check_interval=3,
                       check_val_every_n_epoch=None)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    assert trainer.global_step == 3 and int(module.ema_updates) == 3
    assert "val/loss" in trainer.callback_metrics and "val/sample_mse" in trainer.callback_metrics
    raw = dict(module.model.named_parameters())
    ema = dict(module.ema_model.named_parameters())
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA lags the trained weights

    last = tmp_path / "ckpt" / "last.ckpt"
    loaded = load_biflownet(last)  # torch.load(weights_only=True) inside
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, module.ema_model.state_dict()[k], rtol=0, atol=0)
    assert loaded.conditioning["step"] == 3 and loaded.conditioning["cross_attention"] == "footprint"
    assert loaded.diffusion.hparams()["target"] == "v"
    torch.testing.assert_close(loaded.latent_std.flatten(), torch.full((4,), 2.0))
    raw_loaded = load_biflownet(last, use_ema=False).model
    torch.testing.assert_close(dict(raw_loaded.named_parameters())["dit.embed.weight"], raw["dit.embed.weight"])

    resumed = _module()
    trainer2 = _trainer(tmp_path, max_steps=5, limit_val_batches=0)
    trainer2.fit(resumed, train_dataloaders=loader(), ckpt_path=str(last))
    assert trainer2.global_step == 5 and int(resumed.ema_updates) == 5
    assert load_biflownet(tmp_path / "ckpt" / "last.ckpt").conditioning["step"] == 5


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    module = _module()
    trainer = _trainer(tmp_path, max_steps=10, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        trainer.fit(module, train_dataloaders=DataLoader(_Latents(6, nan_from=4), batch_size=2))
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_latent_shape_mismatch_in_a_batch_names_the_subjects(tmp_path: Path) -> None:
    module = _module()
    batch = next(iter(DataLoader(_Latents(2), batch_size=2)))
    batch["latent"] = torch.randn(2, 4, 16, 16, 16)
    with pytest.raises(ValueError, match=r"subjects \['s0', 's1'\].*latent_shape"):
        module._unpack(batch)


def test_normalisation_round_trip_and_bad_stats() -> None:
    module = _module()
    z = torch.randn(2, 4, 8, 8, 8)
    torch.testing.assert_close(module.denormalize(module.normalize(z)), z)
    with pytest.raises(ValueError, match="std"):
        BiFlowNetModule(tiny_network(), DIFFUSION, latent_stats={"mean": 0.0, "std": 0.0})
    with pytest.raises(ValueError, match="2 mean values; the latents have 4 channels"):
        BiFlowNetModule(tiny_network(), DIFFUSION, latent_stats={"mean": [0.0, 1.0], "std": 1.0})


def test_load_biflownet_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file; expected a biflownet checkpoint"):
        load_biflownet(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load_biflownet(tmp_path / "other.ckpt")
