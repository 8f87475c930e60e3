"""LoRA fine-tuning: only adapters train, adapters save atomically and reload to the same outputs, misfits are refused."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ddpm import BiFlowNet, BiFlowNetModule, load_biflownet
from ddpm.lora import (
    ADAPTER_META,
    DEFAULT_TARGETS,
    LoraSettings,
    apply_lora,
    base_parameters,
    iter_adapter_parameters,
    load_adapter,
    read_adapter_meta,
    resolve_target_modules,
    weights_fingerprint,
)
from tests.ddpm.conftest import randomize, tiny_network
from tests.ddpm.test_module import DIFFUSION, _Latents

NETWORK = tiny_network(cross_attention="footprint", back_projection=True)
UNET_CONVS = r"unet\.(down|up)\.\d+\.res[12]\.conv[12]\.conv"
LORA = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": [*DEFAULT_TARGETS, UNET_CONVS]}


def _fit(module: BiFlowNetModule, root: Path, steps: int) -> L.Trainer:
    trainer = L.Trainer(default_root_dir=root, accelerator="cpu", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(_Latents(4), batch_size=2))
    return trainer


def _base_checkpoint(root: Path, seed: int) -> Path:
    """A real Lightning checkpoint of a briefly trained BiFlowNet with random (active) weights."""
    module = BiFlowNetModule(NETWORK, DIFFUSION, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                             latent_stats={"mean": 1.0, "std": 2.0}, ema_decay=0.5)
    randomize(module.model, std=0.1, seed=seed)
    module.ema_model.load_state_dict(module.model.state_dict())
    trainer = _fit(module, root / f"base{seed}", steps=1)
    path = root / f"base{seed}.ckpt"
    trainer.save_checkpoint(path)
    return path


def _lora_module(base: Path, adapter_dir: Path | None = None, **lora) -> BiFlowNetModule:
    return BiFlowNetModule(NETWORK, DIFFUSION, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
                           latent_stats={"mean": 0.0, "std": 1.0}, ema_decay=0.5, init_from=str(base),
                           lora={**LORA, **lora}, adapter_dir=str(adapter_dir) if adapter_dir else None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Base checkpoint, a second unrelated base, and a LoRA run of 3 steps with the state before and after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("lora")
        base = _base_checkpoint(root, seed=0)
        other = _base_checkpoint(root, seed=1)
        module = _lora_module(base, root / "adapter")
        before = {k: v.clone() for k, v in module.state_dict().items()}
        trainer = _fit(module, root / "run", steps=3)
        last = root / "run.ckpt"
        trainer.save_checkpoint(last)
    finally:
        torch.set_num_threads(threads)
    return {"base": base, "other": other, "module": module, "before": before, "adapter": root / "adapter",
            "last": last, "root": root}


def _outputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], y=inputs["y"], ap=inputs["ap"], lat=inputs["lat"])


def test_only_adapter_parameters_change_and_the_fraction_is_small(trained: dict) -> None:
    module, before = trained["module"], trained["before"]
    after = module.state_dict()
    adapters = [k for k in after if "lora_" in k]
    base = [k for k in after if "lora_" not in k and after[k].is_floating_point()]
    assert adapters and base
    for k in base:  # every base weight and buffer, of the trained and the EMA copy, bit for bit
        assert torch.equal(after[k], before[k]), f"base tensor {k} changed"
    changed = [k for k in adapters if not torch.equal(after[k], before[k])]
    assert set(changed) == set(adapters), f"adapters that did not train: {sorted(set(adapters) - set(changed))}"
    # only adapters are trainable and the optimiser holds nothing else
    assert all(("lora_" in n) == p.requires_grad for n, p in module.model.named_parameters())
    trainable, total = module.trainable_counts()
    assert trainable == sum(p.numel() for _, p in iter_adapter_parameters(module.model))
    assert 0 < trainable / total < 0.1
    # the base's EMA weights and latent statistics started the run
    base_loaded = load_biflownet(trained["base"])
    assert weights_fingerprint(module.model) == weights_fingerprint(base_loaded.model)
    torch.testing.assert_close(module.latent_std, base_loaded.latent_std, rtol=0, atol=0)


def test_saved_adapter_records_base_and_reloads_to_identical_outputs(trained: dict, inputs: dict) -> None:
    adapter = trained["adapter"]
    meta = read_adapter_meta(adapter)
    assert meta["step"] == 3 and meta["base_checkpoint"] == str(trained["base"].resolve())
    assert meta["adapter_parameters"] < 0.1 * meta["total_parameters"]
    assert "dit.in_blocks.0.attn.qkv" in meta["target_modules"] and "xray.encoder.blocks.0.mlp.fc1" in meta["target_modules"]
    assert not list(adapter.parent.glob(".adapter.*"))  # no temp folders left behind

    expected = _outputs(trained["module"].ema_model, inputs)
    plain = _outputs(load_biflownet(trained["base"]).model, inputs)
    assert not torch.allclose(expected, plain, atol=1e-4)  # the adapter changes the network

    unmerged = load_biflownet(trained["base"], adapter=adapter, merge_adapter=False)
    assert torch.equal(_outputs(unmerged.model, inputs), expected)
    merged = load_biflownet(trained["base"], adapter=adapter)
    assert isinstance(merged.model, BiFlowNet) and not any("lora_" in n for n, _ in merged.model.named_parameters())
    torch.testing.assert_close(_outputs(merged.model, inputs), expected, rtol=1e-4, atol=1e-5)
    assert merged.conditioning["adapter"] == str(adapter)
    # the LoRA run's own checkpoint also loads alone, as the adapted (merged) network
    torch.testing.assert_close(_outputs(load_biflownet(trained["last"]).model, inputs), expected, rtol=1e-4, atol=1e-5)


def test_adapter_that_does_not_fit_is_refused(trained: dict) -> None:
    adapter = trained["adapter"]
    with pytest.raises(ValueError, match=rf"adapter {adapter} does not fit the base model: .*fingerprint"):
        load_biflownet(trained["other"], adapter=adapter)  # same architecture, other weights
    wide = tiny_network(cross_attention="footprint", back_projection=True, model_channels=16)
    with pytest.raises(ValueError, match=r"does not fit the base model: different network configuration \(model_channels"):
        load_adapter(BiFlowNet(**wide), adapter, network=wide)
    with pytest.raises(ValueError, match=r"layer 'dit.in_blocks.0.attn.qkv' is \['Linear', 8, 24\] in the adapter but "
                                         r"\['Linear', 16, 48\] in the base"):
        load_adapter(BiFlowNet(**wide), adapter)  # shapes checked even without a network config
    shallow = tiny_network(cross_attention="footprint", back_projection=True, xray=None)
    shallow.update(cross_attention="none", back_projection=False)
    with pytest.raises(ValueError, match=r"layer 'xray.encoder.blocks.0.attn.qkv' does not exist in the base"):
        load_adapter(BiFlowNet(**shallow), adapter)
    with pytest.raises(ValueError, match="LoRA fine-tuning checkpoint"):
        load_biflownet(trained["last"], adapter=adapter)


def test_missing_or_foreign_adapter_folders(trained: dict, tmp_path: Path) -> None:
    model = load_biflownet(trained["base"]).model
    with pytest.raises(FileNotFoundError, match="no such folder; expected a LoRA adapter folder"):
        load_adapter(model, tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(trained["adapter"], broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        load_adapter(model, broken)
    foreign = tmp_path / "foreign"
    shutil.copytree(trained["adapter"], foreign)
    (foreign / ADAPTER_META).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a BiFlowNet LoRA adapter"):
        load_adapter(model, foreign)
    with pytest.raises(ValueError, match="is a biflownet checkpoint; expected a LoRA adapter folder"):
        load_adapter(model, trained["base"])  # a checkpoint given where the adapter belongs
    with pytest.raises(ValueError, match="is a LoRA adapter folder; expected a biflownet checkpoint"):
        load_biflownet(trained["adapter"])  # and the other way round
    truncated = tmp_path / "truncated"
    shutil.copytree(trained["adapter"], truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors: truncated or not a safetensors file"):
        load_adapter(model, truncated)


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old_adapter(trained: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], target)
    old = (target / "adapter_model.safetensors").read_bytes()
    module = trained["module"]

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ddpm.lora.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        module.save_adapter(str(target))
    assert (target / "adapter_model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    with torch.no_grad():
        next(p for _, p in iter_adapter_parameters(module.ema_model)).add_(1.0)
    try:
        module.save_adapter(str(target))
    finally:
        with torch.no_grad():
            next(p for _, p in iter_adapter_parameters(module.ema_model)).sub_(1.0)
    assert (target / "adapter_model.safetensors").read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_settings_and_targets_are_validated(trained: dict) -> None:
    net = BiFlowNet(**NETWORK)
    targets = resolve_target_modules(net, DEFAULT_TARGETS)
    assert "dit.out_blocks.1.cross.kv" in targets and "xray.encoder.blocks.0.attn.qkv" in targets
    assert not any(n.startswith("unet.") for n in targets)
    wrapped = apply_lora(net, LoraSettings(rank=2))
    assert set(base_parameters(wrapped)) == set(dict(BiFlowNet(**NETWORK).named_parameters()))
    with pytest.raises(ValueError, match=r"patterns \['.*attention'\] match no Linear/Conv layer"):
        resolve_target_modules(BiFlowNet(**NETWORK), [r"dit\.in_blocks\.\d+\.attention"])
    with pytest.warns(UserWarning, match=r"patterns \['.*attention'\] match no layer of this network"):
        assert list(resolve_target_modules(BiFlowNet(**NETWORK), [r"dit\.in_blocks\.\d+\.attention", "unet.init_conv"])) == ["unet.init_conv"]
    with pytest.raises(ValueError, match="rank=0 must be >= 1"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match=r"unknown LoRA setting\(s\) \['r'\]"):
        LoraSettings.from_dict({"r": 4})
    with pytest.raises(ValueError, match="needs init_from"):
        BiFlowNetModule(NETWORK, DIFFUSION, lora=LORA)
    with pytest.raises(ValueError, match=r"network configuration differs from the base \(model_channels"):
        BiFlowNetModule({**NETWORK, "model_channels": 16}, DIFFUSION, init_from=str(trained["base"]), lora=LORA)
