"""Debug and scale options of both trainings: fast_dev_run through each entry point, gradient accumulation and
clipping (by norm or value) in the autoencoder's manual optimisation and in BiFlowNet's Trainer settings, and the
FSDP trainer preset (composes, builds its strategy and activation-checkpointing policy on CPU; GPU-only fit)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, apply_activation_checkpointing
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader

from AutoEncoder import PatchVolumeModule
from ddpm import BiFlowNet
from ddpm.dit_block import DiTBlock
from tests.AutoEncoder.conftest import tiny_config
from tests.AutoEncoder.test_patch_volume_module import _Volumes
from tests.train.test_train_BiFlowNet import write_proxy_latents

ROOT = Path(__file__).resolve().parents[2]
NO_GAN = {"perceptual_weight": 0.0, "gan_weight": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU kernels: see tests/conftest.py


@pytest.fixture(scope="module")
def latent_data(tiny_prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_proxy_latents(tiny_prepared_dataset, tmp_path_factory.mktemp("scale_latents") / "data")


def _compose(name: str, overrides: list[str]) -> DictConfig:
    with hydra.initialize_config_dir(str(ROOT / "config"), version_base="1.3"):
        return hydra.compose(name, overrides=overrides)


def _biflownet_overrides(data: Path, runs: Path) -> list[str]:
    return ["experiment=biflownet_tiny", f"paths.data_dir={data}", f"paths.log_dir={runs}", "logger=none",
            "trainer.limit_val_batches=1", "network.xray.image_size=[32,32]"]


class StepRecorder(L.Callback):
    """Records batches seen, trainer settings and, after every ``every`` batches, the largest gradient element
    and the total gradient norm (test helper)."""

    last: StepRecorder | None = None

    def __init__(self, every: int = 1) -> None:
        self.every, self.batches, self.max_grad, self.norm, self.settings = every, 0, [], [], {}
        StepRecorder.last = self

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.batches += 1
        self.settings = {"algorithm": getattr(trainer.gradient_clip_algorithm, "value", None), "clip": trainer.gradient_clip_val,
                         "accumulate": trainer.accumulate_grad_batches, "global_step": trainer.global_step}
        if self.batches % self.every == 0:
            grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
            flat = torch.cat(grads) if grads else None
            self.max_grad.append(None if flat is None else float(flat.abs().max()))
            self.norm.append(None if flat is None else float(flat.norm()))


# ------------------------------------------------------------------------------------------------ fast_dev_run
def test_fast_dev_run_patchvolume(tiny_prepared_dataset: Path, tmp_path: Path) -> None:
    cfg = _compose("train_PatchVolume", ["experiment=ae_tiny", "debug=fast_dev_run", f"paths.output_dir={tmp_path}",
                                         f"paths.data_dir={tiny_prepared_dataset.parent}", "data.queue_length=4",
                                         "data.samples_per_volume=1"])
    assert cfg.trainer.fast_dev_run == 2 and not cfg.logger and cfg.ckpt_path is None
    from train.train_PatchVolume import run

    out = run(cfg)
    assert out["global_step"] == 2 and out["iteration"] == 2  # 2 batches, GAN not started yet
    assert "val/psnr" in out["metrics"]  # validation batches ran too
    assert not Path(out["last_checkpoint"]).exists()  # fast_dev_run writes no checkpoints


def test_fast_dev_run_biflownet(latent_data: Path, tmp_path: Path) -> None:
    cfg = _compose("train_BiFlowNet", [*_biflownet_overrides(latent_data, tmp_path), "debug=fast_dev_run"])
    from train.train_BiFlowNet import run

    out = run(cfg)
    assert out["global_step"] == 2 and "val/loss" in out["metrics"]
    assert not Path(out["last_checkpoint"]).exists()


# -------------------------------------------------------------------------- BiFlowNet: accumulation + clipping
def test_biflownet_accumulation_and_value_clipping_from_config(latent_data: Path, tmp_path: Path) -> None:
    from train.train_BiFlowNet import run

    cfg = _compose("train_BiFlowNet", [
        *_biflownet_overrides(latent_data, tmp_path), "trainer.max_steps=2", "trainer.val_check_interval=null",
        "trainer.check_val_every_n_epoch=null", "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=1e-3",
        "trainer.gradient_clip_algorithm=value", "ckpt_path=null", "global_batch_size=1",  # 6 batches an epoch
        "+callbacks.record._target_=tests.train.test_scale_options.StepRecorder", "+callbacks.record.every=2",
    ])
    out = run(cfg)
    rec = StepRecorder.last
    assert out["global_step"] == 2 and rec.batches == 4  # two optimiser steps from four batches
    assert rec.settings["algorithm"] == "value" and rec.settings["accumulate"] == 2
    # after each step the (accumulated) gradients that were applied are clipped to +-1e-3
    assert rec.max_grad and all(g is not None and g <= 1e-3 + 1e-9 for g in rec.max_grad)
    assert all(n > 1e-2 for n in rec.norm)  # clipped element-wise, not by norm (which would bound this to 1e-3)


# -------------------------------------------------------------------- autoencoder: manual accumulation + clipping
def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1.0)  # lr 1: a step moves every parameter by exactly minus its gradient


def _ae_step(batch_size: int, steps: int = 1, **module_kw: Any) -> tuple[dict[str, torch.Tensor], PatchVolumeModule, L.Trainer]:
    torch.manual_seed(0)
    module = PatchVolumeModule(tiny_config(4, n_codes=0), loss=NO_GAN, optimizer=_sgd, **module_kw)
    before = {n: p.detach().clone() for n, p in module.autoencoder.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(_Volumes(n=4), batch_size=batch_size))
    delta = {n: before[n] - p.detach() for n, p in module.autoencoder.named_parameters()}  # = applied gradient
    return delta, module, trainer


def test_autoencoder_accumulating_two_batches_equals_one_double_batch() -> None:
    accumulated, module, trainer = _ae_step(batch_size=2, accumulate_grad_batches=2, grad_clip=0.0)
    assert trainer.global_step == 1 and int(module.iteration) == 2  # one optimiser step after two batches
    whole, _, _ = _ae_step(batch_size=4, grad_clip=0.0)
    assert any(v.abs().max() > 0 for v in whole.values())
    for name, g in whole.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-4, atol=1e-6, msg=name)
    single, _, _ = _ae_step(batch_size=2, grad_clip=0.0)  # one batch of two is a different gradient
    assert any(not torch.allclose(single[n], g, rtol=1e-3, atol=1e-6) for n, g in whole.items())


@pytest.mark.parametrize("algorithm", ["value", "norm"])
def test_autoencoder_gradient_clipping_by_value_or_norm(algorithm: str) -> None:
    bound = 1e-4
    delta, _, _ = _ae_step(batch_size=2, grad_clip=bound, grad_clip_algorithm=algorithm)
    flat = torch.cat([v.flatten() for v in delta.values()])
    if algorithm == "value":
        assert flat.abs().max() <= bound + 1e-7  # fp32 rounding of (p - (p - g))
        assert flat.norm() > bound * 5  # a value bound leaves the total norm far above it
    else:
        torch.testing.assert_close(flat.norm(), torch.tensor(bound), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="grad_clip_algorithm"):
        PatchVolumeModule(tiny_config(4), grad_clip_algorithm="max")
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        PatchVolumeModule(tiny_config(4), accumulate_grad_batches=0)


def test_patchvolume_config_exposes_the_options(tiny_prepared_dataset: Path) -> None:
    cfg = _compose("train_PatchVolume", ["experiment=ae_tiny", "module.accumulate_grad_batches=4",
                                         "module.grad_clip_algorithm=value", "data.cache_rate=1.0", "data.num_workers=2"])
    module = hydra.utils.instantiate(cfg.module, _convert_="all")
    assert module.hparams.accumulate_grad_batches == 4 and module.hparams.grad_clip_algorithm == "value"
    dm = hydra.utils.instantiate(cfg.data, manifest=str(tiny_prepared_dataset), _convert_="all")
    assert dm.cache_rate == 1.0 and dm.num_workers == 2


# ------------------------------------------------------------------------------------------------------- FSDP
@pytest.mark.parametrize("entry", ["train_BiFlowNet", "train_PatchVolume"])
def test_fsdp_preset_composes_and_builds_its_strategy(entry: str) -> None:
    cfg = _compose(entry, ["trainer=fsdp"])
    assert cfg.trainer.strategy._target_.endswith("FSDPStrategy") and cfg.trainer.gradient_clip_algorithm == "value"
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = hydra.utils.instantiate(trainer_cfg["strategy"])
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    assert DiTBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    if not torch.cuda.is_available():
        # Lightning refuses FSDP without CUDA: the Trainer itself is only built in the gpu test below
        with pytest.raises(Exception, match="(?i)gpu"):
            hydra.utils.instantiate(trainer_cfg, logger=False)


def test_fsdp_activation_checkpointing_policy_wraps_the_biflownet_blocks() -> None:
    cfg = _compose("train_BiFlowNet", ["experiment=biflownet_tiny", "trainer=fsdp", "network.xray.image_size=[32,32]"])
    policy = hydra.utils.instantiate(OmegaConf.to_container(cfg.trainer.strategy.activation_checkpointing_policy))
    torch.manual_seed(0)
    net = BiFlowNet(**OmegaConf.to_container(cfg.network, resolve=True))
    # zero-initialised output layers would make every gradient but theirs zero; give them weights
    for name, p in net.named_parameters():
        if torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.02)
    wrapped = copy.deepcopy(net)
    apply_activation_checkpointing(wrapped, auto_wrap_policy=policy)  # what FSDPStrategy does with the policy
    kinds = {type(m._checkpoint_wrapped_module).__name__ for m in wrapped.modules() if isinstance(m, CheckpointWrapper)}
    assert {"DiTBlock", "Block", "DiffusionUNetResnetBlock"} <= kinds
    inputs = (torch.randn(2, 4, 8, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 1]), torch.rand(2, 1, 32, 32),
              torch.rand(2, 1, 32, 32))
    grads = []
    for model in (net, wrapped):
        model.train()
        model(*inputs).square().mean().backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_patchvolume_module_refuses_fsdp() -> None:
    module = PatchVolumeModule(tiny_config(4), loss=NO_GAN)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="trainer=fsdp is not supported for the autoencoder"):
        module.setup("fit")
    module._trainer = None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_trains_biflownet_on_one_gpu(latent_data: Path, tmp_path: Path) -> None:
    from train.train_BiFlowNet import run

    out = run(_compose("train_BiFlowNet", [*_biflownet_overrides(latent_data, tmp_path), "trainer=fsdp", "trainer.devices=1",
                                           "trainer.max_steps=2", "trainer.val_check_interval=2", "ckpt_path=null"]))
    assert out["global_step"] == 2 and Path(out["last_checkpoint"]).is_file()
