"""One LightningModule for BiFlowNet training: loss, EMA weights, condition dropout, validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch import nn

from ddpm.biflownet import BiFlowNet
from ddpm.diffusion import Diffusion, guided


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/Inf; training stops and the last good checkpoint is kept (exit code 3)."""

    exit_code = 3


class BiFlowNetModule(L.LightningModule):
    """Trains a BiFlowNet on precomputed latents, keeping an exponential moving average of its weights.

    Batches are dicts from ``dataset.PairedDataModule``: ``latent`` (B, C, d, h, w) raw autoencoder
    latents (normalised here with the stored statistics), ``ap``/``lat`` (B, 1, H, W) X-rays in [0, 1],
    ``label`` (B,) long, and ``geometry`` (B, 2, 10) the packed DRR geometry of each pair when the dataset
    records one (passed to the network, which uses its default-geometry buffers for default samples).

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
        dataset_json: prepared dataset's ``dataset.json``; when it exists its DRR geometry (cone-beam
            grids) and latent voxel spacing go into the network at ``setup`` (saved with the weights).
        init_from: BiFlowNet checkpoint whose EMA weights (and latent statistics) start this run; its
            network configuration must equal ``network``.
        lora: LoRA settings (``ddpm.lora.LoraSettings`` fields) to fine-tune adapters only on top of the
            ``init_from`` weights, which stay frozen; None trains every weight.
        adapter_dir: folder the (EMA) adapter is written to at the end of training (LoRA only).
        xray_stats: intensity statistics of the training X-rays per view
            (``dataset.xray_harmonization.IntensityReference.to_dict``), stored so that generation can
            match radiographs to them; filled by ``train.train_BiFlowNet``.
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
        init_from: str | None = None,
        lora: dict | None = None,
        adapter_dir: str | None = None,
        xray_stats: dict | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond={p_uncond} is invalid; expected a probability in [0, 1]")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} is invalid; expected a value in [0, 1)")
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = BiFlowNet(**network)
        self.lora_settings = None
        base = self._init_from(init_from, network) if init_from else None
        if lora is not None:
            from ddpm.lora import LoraSettings, apply_lora, weights_fingerprint

            if base is None:
                raise ValueError("LoRA fine-tuning needs init_from=<trained BiFlowNet checkpoint> to adapt")
            self.lora_settings = LoraSettings.from_dict(lora)
            self.model = apply_lora(self.model, self.lora_settings)
            self.base_fingerprint = weights_fingerprint(self.model)  # base weights never change in a LoRA run
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = Diffusion(**diffusion)
        self.optimizer_factory = optimizer
        from dataset.latents import LatentStats

        stats = LatentStats.from_dict(latent_stats, "latent_stats") if latent_stats else LatentStats.identity()
        mean, std = stats.tensors(self.model.in_channels)
        self.register_buffer("latent_mean", mean)
        self.register_buffer("latent_std", std)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.ema_decay = ema_decay
        self.p_uncond = p_uncond
        self.lr_warmup_steps = lr_warmup_steps
        self.val_timesteps = [int(t) for t in val_timesteps]
        self.val_sample_steps = val_sample_steps
        self.val_guidance_scale = val_guidance_scale
        self.dataset_json = dataset_json
        self.init_from = init_from
        self.adapter_dir = adapter_dir
        if base is not None:
            # keep the base's latent normalisation: the fine-tuned network must see latents scaled as before
            self.latent_mean.copy_(base.latent_mean.reshape_as(self.latent_mean))
            self.latent_std.copy_(base.latent_std.reshape_as(self.latent_std))

    def _init_from(self, path: str, network: dict):
        """Load the base checkpoint's EMA weights into ``self.model``; the network configs must agree."""
        from ddpm.loading import load_biflownet
        from ddpm.lora import network_differences

        base = load_biflownet(path)
        diff = network_differences(dict(network), base.hparams["network"], ("here", "in the base"))
        if diff:
            raise ValueError(f"init_from={path}: network configuration differs from the base ({'; '.join(diff[:5])})")
        self.model.load_state_dict(base.model.state_dict())
        return base

    def trainable_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the trained network (adapters count as trainable under LoRA)."""
        return count_parameters(self.model, trainable_only=True), count_parameters(self.model)

    def save_adapter(self, adapter_dir: str | None = None) -> Path:
        """Write the EMA adapter with ``ddpm.lora.save_adapter`` (LoRA runs only); returns the folder."""
        from ddpm.lora import save_adapter

        if self.lora_settings is None:
            raise ValueError("save_adapter needs a LoRA run (module built with lora=...)")
        target = adapter_dir or self.adapter_dir
        if not target:
            raise ValueError("no adapter_dir given")
        trainable, total = self.trainable_counts()
        return Path(save_adapter(
            self.ema_model, target, base_checkpoint=self.init_from, network=dict(self.hparams["network"]),
            settings=self.lora_settings, step=int(self.global_step),
            extra={"adapter_parameters": trainable, "total_parameters": total, "trainable_fraction": trainable / total},
        ))

    def on_train_end(self) -> None:
        if self.lora_settings is not None and self.adapter_dir and self.trainer.is_global_zero:
            self.save_adapter()

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Put the dataset's DRR geometry and latent voxel spacing into the network (before a checkpoint, if
        any, is restored): the grid buffers of the default geometry, and what per-sample geometries need."""
        if self.model.xray is None or not self.dataset_json or not Path(self.dataset_json).is_file():
            return
        from ddpm.projection import dataset_geometry

        geometry, spacing = dataset_geometry(self.dataset_json, self.model.latent_shape)
        for net in (self.model, self.ema_model):
            net.set_geometry(geometry, spacing)

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
        if self.model.xray is not None:
            cond["ap"], cond["lat"] = batch["ap"].float(), batch["lat"].float()
            if batch.get("geometry") is not None:
                cond["geometry"] = batch["geometry"]  # (B, 2, 10) per-sample DRR geometry
        return self.normalize(z.float()), cond

    # --------------------------------------------------------------- training
    def condition_dropout(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """(batch_size,) bool: True for each sample whose conditions are all dropped (probability ``p_uncond``)."""
        return torch.rand(batch_size, device=device) < self.p_uncond

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        z, cond = self._unpack(batch)
        drop = self.condition_dropout(z.shape[0], z.device)
        loss = self.diffusion.training_loss(lambda x, t: self.model(x, t, drop=drop, **cond), z)
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            # step N is the N-th optimiser step (global_step counts the finished ones), as in checkpoint names
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step + 1}; stopping without "
                "checkpointing it; lower the learning rate or check the latents"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        return loss

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step: ema <- d * ema + (1 - d) * model, with d warmed up from 0.1."""
        n = int(self.ema_updates)
        decay = min(self.ema_decay, (1 + n) / (10 + n))
        # frozen weights (the LoRA base) are equal in both copies and need no averaging
        pairs = [(e, p.detach()) for e, p in zip(self.ema_model.parameters(), self.model.parameters()) if p.requires_grad]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
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
        opt = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.lr_warmup_steps <= 0:
            return opt
        warm = self.lr_warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["biflownet_format"] = 1  # lets load_biflownet tell our checkpoints from others
        if self.lora_settings is not None:
            checkpoint["lora_base_fingerprint"] = self.base_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to resume a LoRA run on top of a base checkpoint that has changed since it started."""
        saved = checkpoint.get("lora_base_fingerprint")
        if self.lora_settings is not None and saved is not None:
            if saved != self.base_fingerprint:
                raise ValueError(f"init_from={self.init_from}: its weights differ from the base this LoRA run "
                                 "started on; resume with the original base checkpoint")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module``; with ``trainable_only`` only those with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["BiFlowNetModule", "NonFiniteLossError", "count_parameters"]
