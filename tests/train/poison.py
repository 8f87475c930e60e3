"""Test helper callbacks that make a run's weights or loss non-finite at a chosen step, as a learning rate that blows up
would (also through a Hydra override: ``+callbacks.poison._target_=tests.train.poison.NanGradient``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class NanGradient(L.Callback):
    """Puts NaN into one gradient just before the ``step``-th optimiser step, so the weights are NaN after it."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step + 1 == self.step:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grads[0].fill_(float("nan"))


class NanWeight(L.Callback):
    """Sets one parameter of ``attribute`` (``model``, ``ema_model``) to NaN before the ``step``-th training step."""

    def __init__(self, step: int, attribute: str = "model") -> None:
        self.step = int(step)
        self.attribute = attribute

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                next(getattr(pl_module, self.attribute).parameters()).fill_(float("nan"))
