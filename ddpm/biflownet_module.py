"""One LightningModule for BiFlowNet training: loss, EMA weights, condition dropout, validation."""

from __future__ import annotations

import copy
from typing import Any, Callable

import lightning as L
import torch
from torch import nn

from ddpm.biflownet import BiFlowNet
from ddpm.diffusion import Diffusion, guided


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/Inf; training stops and the last good checkpoint is kept."""


def _stats_tensor(value: Any, channels: int, name: str) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=torch.float32).flatten()
    if v.numel() == 1:
        v = v.expand(channels).clone()
    if v.numel() != channels:
        raise ValueError(f"latent_stats['{name}'] has {v.numel()} values, expected 1 or {channels} (latent channels)")
    return v.reshape(1, channels, 1, 1, 1)


class BiFlowNetModule(L.LightningModule):
    """Trains a BiFlowNet on precomputed latents, keeping an exponential moving average of its weights.

    Batches are dicts from ``dataset.PairedDataModule``: ``latent`` (B, C, d, h, w) raw autoencoder
    latents (normalised here with the stored statistics), ``ap``/``lat`` (B, 1, H, W) X-rays in [0, 1],
    ``label`` (B,) long.

    Args:
        network: BiFlowNet keyword arguments (plain dict, stored in the checkpoint).
        diffusion: Diffusion keyword arguments (plain dict, stored in the checkpoint).
        optimizer: partial optimiser constructor taking the parameters (from Hydra ``_partial_``).
        latent_stats: {"mean": float | list, "std": float | list} of the raw latents, or None (0, 1).
        ema_decay: EMA decay (with the usual (1 + n) / (10 + n) warm-up).
        p_uncond: probability of dropping all conditions of a sample (classifier-free guidance).
        lr_warmup_steps: linear learning-rate warm-up.
        val_timesteps: fixed timesteps of the validation denoising loss.
        val_sample_steps: DDIM/flow steps of the small validation sample (0 disables it).
        val_guidance_scale: CFG scale of the validation sample.
        dataset_json: prepared dataset's ``dataset.json``; when it exists the real cone-beam grids
            replace the parallel-beam default at ``setup``.
    """

    def __init__(
        self,
        network: dict,
        diffusion: dict,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        latent_stats: dict | None = None,
        ema_decay: float = 0.9999,
        p_uncond: float = 0.1,
        lr_warmup_steps: int = 0,
        val_timesteps: tuple[int, ...] | list[int] = (100, 300, 500, 700, 900),
        val_sample_steps: int = 4,
        val_guidance_scale: float = 1.0,
        dataset_json: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = BiFlowNet(**network)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = Diffusion(**diffusion)
        self.optimizer_factory = optimizer
        c = self.model.in_channels
        stats = latent_stats or {"mean": 0.0, "std": 1.0}
        std = _stats_tensor(stats["std"], c, "std")
        if (std <= 0).any() or not torch.isfinite(std).all():
            raise ValueError(f"latent_stats['std'] must be positive and finite, got {stats['std']}")
        self.register_buffer("latent_mean", _stats_tensor(stats["mean"], c, "mean"))
        self.register_buffer("latent_std", std)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.ema_decay = ema_decay
        self.p_uncond = p_uncond
        self.lr_warmup_steps = lr_warmup_steps
        self.val_timesteps = [int(t) for t in val_timesteps]
        self.val_sample_steps = val_sample_steps
        self.val_guidance_scale = val_guidance_scale
        self.dataset_json = dataset_json

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Put the dataset's cone-beam geometry into the network (before a checkpoint, if any, is restored)."""
        from pathlib import Path

        if self.model.xray_encoder is None or not self.dataset_json or not Path(self.dataset_json).is_file():
            return
        from ddpm.projection import cone_beam_grids

        grid_ap, grid_lat = cone_beam_grids(self.dataset_json, self.model.latent_shape)
        for net in (self.model, self.ema_model):
            net.set_projection_grids(grid_ap.to(self.device), grid_lat.to(self.device))

    # --------------------------------------------------------------- helpers
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (B, C, d, h, w) -> zero-mean unit-std latent."""
        return (z - self.latent_mean) / self.latent_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> raw autoencoder latent."""
        return z * self.latent_std + self.latent_mean

    def _unpack(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if "latent" not in batch:
            raise ValueError(f"batch has no 'latent' entry (keys {sorted(batch)}); load=('ap', 'lat', 'latent') expected")
        z = batch["latent"]
        expected = (self.model.in_channels, *self.model.latent_shape)
        if z.ndim != 5 or tuple(z.shape[1:]) != expected:
            ids = batch.get("subject_id", "?")
            raise ValueError(
                f"latent batch for subjects {ids} has shape {tuple(z.shape)}, expected (B, {', '.join(map(str, expected))}) "
                "from network.in_channels/latent_shape"
            )
        cond: dict = {}
        if self.model.num_classes > 0:
            cond["y"] = batch["label"].long()
        if self.model.xray_encoder is not None:
            cond["ap"], cond["lat"] = batch["ap"].float(), batch["lat"].float()
        return self.normalize(z.float()), cond

    # --------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        z, cond = self._unpack(batch)
        drop = torch.rand(z.shape[0], device=z.device) < self.p_uncond
        loss = self.diffusion.training_loss(lambda x, t: self.model(x, t, drop=drop, **cond), z)
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopping. "
                "The last good checkpoint is kept; lower the learning rate or check the latents."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        return loss

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step: ema <- d * ema + (1 - d) * model, with d warmed up from 0.1."""
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        ema_p = [p for p in self.ema_model.parameters()]
        src_p = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)
        for eb, b in zip(self.ema_model.buffers(), self.model.buffers()):
            eb.copy_(b)
        self.ema_updates += 1

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # EMA right after each real optimiser step, before callbacks (checkpointing) see the batch end
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    # -------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        z, cond = self._unpack(batch)
        b = z.shape[0]
        net = self.ema_model
        gen = torch.Generator(device=z.device).manual_seed(1234 + batch_idx)
        losses = []
        for t in self.val_timesteps:
            tt = torch.full((b,), min(t, self.diffusion.num_train_timesteps - 1), device=z.device, dtype=torch.long)
            losses.append(self.diffusion.training_loss(lambda x, s: net(x, s, **cond), z, t=tt, generator=gen))
        self.log("val/loss", torch.stack(losses).mean(), sync_dist=True, batch_size=b)
        if batch_idx == 0 and self.val_sample_steps > 0:
            one = {k: v[:1] for k, v in cond.items()}  # one sample per rank: cheap on every rank
            noise = torch.randn(z[:1].shape, generator=gen, device=z.device)
            x0 = self.diffusion.sample(
                guided(net, self.val_guidance_scale, **one), noise, gen, num_inference_steps=self.val_sample_steps
            )
            self.log("val/sample_mse", torch.mean((x0 - z[:1]) ** 2), sync_dist=True, batch_size=1)

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("BiFlowNetModule needs an optimizer factory (config group `optimizer`)")
        opt = self.optimizer_factory(self.model.parameters())
        if self.lr_warmup_steps <= 0:
            return opt
        warm = self.lr_warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["biflownet_format"] = 1  # lets load_biflownet tell our checkpoints from others


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["BiFlowNetModule", "NonFiniteLossError", "count_parameters"]
