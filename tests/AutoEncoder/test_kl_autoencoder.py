"""KL (Gaussian bottleneck) autoencoder: posterior maths, deterministic encoding vs sampled training forward, a
training step, bad configurations, latent statistics of the training latents, and a Hydra run of ae_kl_tiny."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from AutoEncoder import GaussianBottleneck, PatchVolumeAutoencoder, PatchVolumeModule, load_autoencoder
from dataset.latents import LatentStats, read_latent
from dataset import CTDataModule
from tests.AutoEncoder.conftest import tiny_config
from tests.AutoEncoder.test_patch_volume_module import _GradCheck, _Volumes
from train.generate_training_latent import generate

ROOT = Path(__file__).resolve().parents[2]
NO_GAN = {"perceptual_weight": 0.0, "gan_weight": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


def _kl_config(**overrides: Any) -> dict[str, Any]:
    return tiny_config(4, n_codes=0, bottleneck="kl", codebook=None, **overrides)


def test_gaussian_bottleneck_kl_and_sampling() -> None:
    bottleneck = GaussianBottleneck(2)
    mean = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1).expand(3, 2, 4, 4, 4)
    logvar = torch.tensor([0.0, 2.0 * torch.log(torch.tensor(0.5))]).view(1, 2, 1, 1, 1).expand(3, 2, 4, 4, 4)
    moments = torch.cat([mean, logvar], dim=1)
    out = bottleneck(moments)
    # per element: 0.5 * (mu^2 + var - 1 - log var); channel 0 gives 0, channel 1 mu=1, var=0.25
    per_sample = 64 * 0.5 * (1.0 + 0.25 - 1.0 - torch.log(torch.tensor(0.25)))
    torch.testing.assert_close(out.kl_loss, per_sample)
    big = bottleneck(torch.cat([mean, logvar], 1).repeat(1, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(big.latent[:, 1].mean(), torch.tensor(1.0), atol=0.01, rtol=0)
    torch.testing.assert_close(big.latent[:, 1].std(), torch.tensor(0.5), atol=0.01, rtol=0)
    bottleneck.eval()
    assert torch.equal(bottleneck(moments).latent, mean)
    with pytest.raises(ValueError, match=r"expected \(B, 4, d, h, w\)"):
        bottleneck(torch.zeros(1, 3, 2, 2, 2))


def test_encode_is_the_deterministic_mean_while_training_forward_samples() -> None:
    torch.manual_seed(0)
    model = PatchVolumeAutoencoder(**_kl_config())
    assert model.bottleneck == "kl" and not model.is_quantized
    assert model.encoder.conv_out.out_channels == 8  # mean and log-variance of 4 latent channels
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    model.train()
    z1, z2 = model.encode(x), model.encode(x)
    assert z1.shape == (2, 4, 4, 4, 4) and torch.equal(z1, z2)
    a, b = model(x), model(x)
    assert a.latent.shape == z1.shape and not torch.allclose(a.latent, b.latent)
    assert not torch.allclose(a.latent, z1)
    assert a.kl_loss > 0 and a.commitment_loss == 0 and a.perplexity == 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).latent, model.encode(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"bottleneck": "kl", "n_codes": 16}, "set n_codes to 0"), ({"bottleneck": "vq", "n_codes": 0}, "n_codes must be >= 1"),
     ({"bottleneck": "gauss", "n_codes": 0}, "expected one of")],
)
def test_bad_bottleneck_configurations_raise(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PatchVolumeAutoencoder(**tiny_config(4, **kwargs))


def test_kl_training_step_has_finite_gradients_and_a_positive_kl_term(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PatchVolumeModule(_kl_config(), loss={**NO_GAN, "kl_weight": 1e-3})
    check = _GradCheck()
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[check])
    trainer.fit(module, DataLoader(_Volumes(), batch_size=2))
    assert trainer.global_step == 1
    assert trainer.callback_metrics["train/kl"] > 0
    grads = {n: g for n, g in check.grads.items() if n.startswith("autoencoder.")}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the log-variance half of the encoder output is trained (by the KL term and the sampled reconstruction)
    assert grads["autoencoder.encoder.conv_out.weight"][4:].abs().sum() > 0


def _train_kl_checkpoint(manifest: Path, out: Path) -> Path:
    torch.manual_seed(0)
    module = PatchVolumeModule(_kl_config(), loss=NO_GAN)
    dm = CTDataModule(manifest, patch_size=16, samples_per_volume=1, queue_length=4, batch_size=2)
    trainer = L.Trainer(default_root_dir=out, accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(out / "kl.ckpt")
    return out / "kl.ckpt"


def test_latent_statistics_are_computed_from_training_latents(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_prepared_dataset.parent, tmp_path / "data")
    manifest = tmp_path / "data" / "manifest.csv"
    ckpt = _train_kl_checkpoint(manifest, tmp_path)
    blob = ckpt.read_bytes()
    generate(manifest, ckpt, chunk_size=4, progress=False)
    assert ckpt.read_bytes() == blob  # the autoencoder checkpoint is never rewritten
    frame = pd.read_csv(manifest)
    train = torch.stack([read_latent(manifest.parent / p)[0]
                         for p, s in zip(frame["latent"], frame["split"]) if s == "train"])  # (N, C, d, h, w)
    per_channel = train.transpose(0, 1).reshape(4, -1).double()
    mean, std = per_channel.mean(1), per_channel.std(1, unbiased=False)
    stats = LatentStats.load(manifest.parent / "latent_stats.json")
    torch.testing.assert_close(torch.tensor(stats.extra["scale_factor"], dtype=torch.float64), 1.0 / per_channel.std(unbiased=False),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(stats.mean, dtype=torch.float64), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(stats.std, dtype=torch.float64), std, rtol=1e-4, atol=1e-5)
    assert stats.ae_fingerprint == load_autoencoder(ckpt).fingerprint and stats.ae_checkpoint == str(ckpt.resolve())
    normalised = stats.normalize(train).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(normalised.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(1, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats.denormalize(stats.normalize(train)), train, atol=1e-5, rtol=1e-5)


def test_kl_experiment_composes_and_trains_through_the_entry_point(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    from train.train_PatchVolume import run

    overrides = [
        "experiment=ae_kl_tiny", f"paths.data_dir={tiny_prepared_dataset.parent}", f"paths.output_dir={tmp_path}",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=none",
        "data.samples_per_volume=1", "data.queue_length=4", "loss.kl_weight=1e-4",
    ]
    with hydra.initialize_config_dir(str(ROOT / "config"), version_base="1.3"):
        cfg = hydra.compose("train_PatchVolume", overrides=overrides)
    assert cfg.module.autoencoder.bottleneck == "kl" and cfg.module.autoencoder.n_codes == 0
    out = run(cfg)
    assert out["global_step"] == 2 and out["metrics"]["train/kl"] > 0 and "val/psnr" in out["metrics"]
    model = load_autoencoder(out["last_checkpoint"]).model
    assert model.bottleneck == "kl" and model.gaussian is not None and model.quantizer is None
