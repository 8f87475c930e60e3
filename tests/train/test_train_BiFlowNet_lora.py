"""train.train_BiFlowNet with experiment=biflownet_lora: base frozen, adapters saved, resume, bad input."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from ddpm import read_adapter_meta, weights_fingerprint
from ddpm.loading import load_biflownet
from tests.train.test_train_BiFlowNet import _compose, _overrides, latent_dataset, write_proxy_latents  # noqa: F401
from train.train_BiFlowNet import run


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


def _lora_overrides(data: Path, runs: Path, base: Path, steps: int) -> list[str]:
    return [
        "experiment=biflownet_lora",
        f"init_from={base}",
        "trainer=cpu",
        "global_batch_size=2",
        "data.num_workers=0",
        "data.pin_memory=false",
        f"paths.data_dir={data}",
        f"paths.log_dir={runs}",
        "logger=none",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "callbacks.checkpoint.every_n_train_steps=2",
        "module.val_sample_steps=1",
        "module.lr_warmup_steps=0",
        "lora@module.lora=dit_xray_unet",
        "module.lora.rank=2",
        "optimizer.lr=1e-2",
    ]


@pytest.fixture(scope="module")
def base_checkpoint(latent_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny X-ray-conditioned BiFlowNet trained for 2 steps with the ordinary entry point."""
    torch.set_num_threads(1)
    out = run(_compose(_overrides(latent_dataset, tmp_path_factory.mktemp("base_run"), steps=2)))
    return Path(out["last_checkpoint"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lora_run_trains_adapters_only_saves_them_and_resumes(latent_dataset: Path, base_checkpoint: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base_sha = _sha(base_checkpoint)
    out = run(_compose(_lora_overrides(latent_dataset, tmp_path, base_checkpoint, steps=2)))
    assert out["global_step"] == 2
    fraction = out["trainable_parameters"] / out["total_parameters"]
    assert 0 < fraction < 0.15
    assert "LoRA:" in capsys.readouterr().out

    # every base weight in the run's checkpoint equals the base checkpoint's EMA weight, bit for bit
    base_sd = torch.load(base_checkpoint, weights_only=True)["state_dict"]
    run_sd = torch.load(out["last_checkpoint"], weights_only=True)["state_dict"]
    compared = 0
    for key, value in run_sd.items():
        for copy in ("model.", "ema_model."):
            if key.startswith(copy) and "lora_" not in key and "grid_" not in key:
                plain = "ema_model." + key[len(copy):].removeprefix("base_model.model.").replace(".base_layer.", ".")
                assert torch.equal(value, base_sd[plain]), key
                compared += 1
    assert compared == 2 * sum(1 for k in base_sd if k.startswith("ema_model.") and "grid_" not in k)
    # zero-initialised B moved in the U-Net and X-ray encoder layers; DiT self-attention/MLP adapters may
    # still be zero here because a 2-step base has its adaLN-Zero gates still at exactly zero
    lora_b = {k: v for k, v in run_sd.items() if k.startswith("ema_model.") and "lora_B" in k}
    ungated = [k for k in lora_b if ".unet.down." in k or ".unet.up." in k or ".xray.encoder." in k]
    assert len(ungated) > 10 and all(lora_b[k].abs().sum() > 0 for k in ungated)
    assert _sha(base_checkpoint) == base_sha  # the base file itself is untouched

    adapter = Path(out["adapter_dir"])
    meta = read_adapter_meta(adapter)
    assert meta["step"] == 2 and meta["base_checkpoint"] == str(base_checkpoint.resolve())
    assert meta["base_fingerprint"] == weights_fingerprint(load_biflownet(base_checkpoint).model)
    assert any(name.startswith("unet.down.") for name in meta["target_modules"])  # the U-Net preset was used
    assert meta["trainable_fraction"] == pytest.approx(fraction)

    resumed = run(_compose(_lora_overrides(latent_dataset, tmp_path, base_checkpoint, steps=4)))
    assert resumed["global_step"] == 4 and read_adapter_meta(adapter)["step"] == 4


def test_resume_on_a_changed_base_is_refused(latent_dataset: Path, base_checkpoint: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.ckpt"
    base.write_bytes(base_checkpoint.read_bytes())
    run(_compose(_lora_overrides(latent_dataset, tmp_path, base, steps=1)))
    ckpt = torch.load(base, weights_only=True)
    ckpt["state_dict"]["ema_model.dit.embed.bias"] += 0.5
    torch.save(ckpt, base)
    with pytest.raises(ValueError, match="differ from the base this LoRA run started on"):
        run(_compose(_lora_overrides(latent_dataset, tmp_path, base, steps=2)))


def test_bad_lora_input_is_rejected(latent_dataset: Path, base_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file; expected a biflownet checkpoint"):
        run(_compose(_lora_overrides(latent_dataset, tmp_path, tmp_path / "missing.ckpt", steps=1)))
    overrides = _lora_overrides(latent_dataset, tmp_path, base_checkpoint, steps=1)
    with pytest.raises(ValueError, match=r"patterns \[.unet_typo.\] match no Linear/Conv layer"):
        run(_compose([*overrides, "module.lora.target_modules=[unet_typo]"]))


def test_lora_on_a_site_smaller_than_the_batch_trains(latent_dataset: Path, base_checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    site = tmp_path / "site"
    shutil.copytree(latent_dataset, site)
    frame = pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)
    frame.loc[frame.index[frame["split"] == "train"][3:], "split"] = "test"  # 3 training subjects
    frame.to_csv(site / "manifest.csv", index=False)
    out = run(_compose([*_lora_overrides(site, tmp_path / "runs", base_checkpoint, steps=2), "global_batch_size=8"]))
    assert out["global_step"] == 2 and Path(out["last_checkpoint"]).is_file()
    assert read_adapter_meta(Path(out["adapter_dir"]))["step"] == 2
    err = capsys.readouterr().err
    assert "3 training subjects hold no full batch of global_batch_size=8 on 1 rank(s); training with batch 3" in err
