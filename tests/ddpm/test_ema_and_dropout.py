"""BiFlowNetModule: the EMA update against hand-computed values, its exact restoration on resume, and
condition dropout (how often it drops, and that the learned null condition trains)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from ddpm import BiFlowNetModule
from tests.ddpm.conftest import randomize, tiny_network
from tests.ddpm.test_module import DIFFUSION, _Latents

# a small unconditional-capable network without X-rays: fast enough for a dozen training steps
PLAIN = tiny_network(xray=None, cross_attention="none", num_classes=2)


def _module(network: dict = PLAIN, **kw) -> BiFlowNetModule:
    kw.setdefault("ema_decay", 0.9)
    return BiFlowNetModule(network, DIFFUSION, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                           val_sample_steps=0, **kw)


def _fill(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def _values(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_ema_update_follows_the_warm_up_decay_then_the_cap() -> None:
    module = _module(ema_decay=0.9)
    _fill(module.ema_model, 0.0)
    expected = []
    # decay = min(0.9, (1 + n) / (10 + n)) at update n; ema <- decay * ema + (1 - decay) * weights
    for weights, value in [(1.0, 0.9),                            # n=0: 0.1 * 0 + 0.9 * 1
                           (0.0, 0.9 * 2 / 11),                   # n=1: decay 2/11
                           (1.0, 0.25 * (0.9 * 2 / 11) + 0.75)]:  # n=2: decay 3/12
        _fill(module.model, weights)
        module.update_ema()
        expected.append(value)
        torch.testing.assert_close(_values(module.ema_model), torch.full_like(_values(module.ema_model), value))
    assert int(module.ema_updates) == 3
    module.ema_updates.fill_(200)  # (1 + 200) / (10 + 200) > 0.9: the cap applies
    _fill(module.model, 0.0)
    module.update_ema()
    ema = _values(module.ema_model)
    torch.testing.assert_close(ema, torch.full_like(ema, 0.9 * expected[-1]))
    assert int(module.ema_updates) == 201


def test_ema_copies_buffers_and_leaves_frozen_weights_alone() -> None:
    module = _module()
    frozen = module.model.t_embedder.mlp[0].weight
    frozen.requires_grad_(False)
    _fill(module.ema_model, 0.0)
    _fill(module.model, 1.0)
    buffer_name, buffer = next(iter(module.model.named_buffers()))
    buffer.add_(3.0)
    module.update_ema()
    ema = dict(module.ema_model.named_parameters())
    assert torch.count_nonzero(ema["t_embedder.mlp.0.weight"]) == 0  # not averaged
    torch.testing.assert_close(ema["t_embedder.mlp.2.weight"], torch.full_like(ema["t_embedder.mlp.2.weight"], 0.9))
    torch.testing.assert_close(dict(module.ema_model.named_buffers())[buffer_name], buffer, rtol=0, atol=0)


class _SeedEachStep(L.Callback):
    """Timesteps, noise and dropout drawn from a seed fixed by the step, so a resumed run sees the same draws."""

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        torch.manual_seed(1000 + trainer.global_step)


def _fit(module: BiFlowNetModule, root: Path, max_steps: int, ckpt_path: Path | None = None) -> None:
    """Train to ``max_steps``, writing ``root/ckpt/last.ckpt`` at the end (resuming from ``ckpt_path``)."""
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=max_steps, save_last=True)
    trainer = L.Trainer(default_root_dir=root, accelerator="cpu", max_steps=max_steps, logger=False,
                        callbacks=[checkpoint, _SeedEachStep()], enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    # one batch per epoch, no shuffling: every epoch sees the same batch, so resuming cannot change the data
    trainer.fit(module, train_dataloaders=DataLoader(_Latents(2), batch_size=2),
                ckpt_path=str(ckpt_path) if ckpt_path else None)
    assert trainer.global_step == max_steps


def test_ema_after_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = _module()
    _fit(straight, tmp_path / "straight", max_steps=4)

    torch.manual_seed(0)
    first = _module()
    _fit(first, tmp_path / "split", max_steps=2)
    halfway = _values(first.ema_model).clone()

    torch.manual_seed(123)  # another initialisation: the resumed state must come from the checkpoint alone
    resumed = _module()
    _fit(resumed, tmp_path / "split", max_steps=4, ckpt_path=tmp_path / "split" / "ckpt" / "last.ckpt")
    assert int(resumed.ema_updates) == int(straight.ema_updates) == 4
    torch.testing.assert_close(_values(resumed.model), _values(straight.model), rtol=0, atol=1e-6)
    torch.testing.assert_close(_values(resumed.ema_model), _values(straight.ema_model), rtol=0, atol=1e-6)
    # the EMA really averages: it differs from the raw weights and moved on since the checkpoint
    assert (_values(resumed.ema_model) - _values(resumed.model)).abs().max() > 1e-4
    assert (_values(resumed.ema_model) - halfway).abs().max() > 1e-4


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_condition_dropout_drops_with_probability_p_uncond(p: float) -> None:
    module = _module(p_uncond=p)
    torch.manual_seed(0)
    n = 20000
    drops = module.condition_dropout(n, "cpu")
    assert drops.dtype == torch.bool and drops.shape == (n,)
    tolerance = 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard deviations
    assert abs(drops.float().mean().item() - p) < tolerance


def test_condition_dropout_never_and_always() -> None:
    assert not _module(p_uncond=0.0).condition_dropout(5000, "cpu").any()
    assert _module(p_uncond=1.0).condition_dropout(5000, "cpu").all()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p_uncond"):
            _module(p_uncond=bad)


class _NullGrads(L.Callback):
    """Records the gradient of the learned null condition after the (single) backward pass."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_after_backward(self, trainer: L.Trainer, pl_module: BiFlowNetModule) -> None:
        enc = pl_module.model.xray_encoder
        self.grads = {name: getattr(enc, name).grad.clone() for name in ("null_tokens", "null_pooled")}


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_null_condition_gets_gradients_only_when_dropped(p: float, tmp_path: Path) -> None:
    module = _module(tiny_network(cross_attention="full"), p_uncond=p)
    randomize(module.model)  # the zero-initialised output would block every gradient
    grads = _NullGrads()
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False,
                        enable_checkpointing=False, callbacks=[grads], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader(_Latents(2), batch_size=2))
    for name, grad in grads.grads.items():
        if p == 0.0:
            assert torch.count_nonzero(grad) == 0, name  # kept in the graph (DDP) but never used
        else:
            assert torch.count_nonzero(grad) > 0, name
