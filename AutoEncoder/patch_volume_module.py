"""LightningModule training the patch-volume autoencoder (stage 1 or 2) with manual G/D optimisation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from monai.metrics import PSNRMetric
from torch import nn

from AutoEncoder.adversarial import adaptive_weight, build_discriminator, hinge_d_loss, hinge_g_loss
from AutoEncoder.patch_volume_autoencoder import PatchVolumeAutoencoder
from AutoEncoder.perceptual_loss import PerceptualLoss
from dataset.cli import check_range

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

DEFAULT_LOSS: dict[str, Any] = {
    "l1_weight": 1.0,
    "commitment_weight": 1.0,
    "kl_weight": 1.0e-6,
    "perceptual_weight": 1.0,
    "perceptual": {"weights_path": None, "mode": "3d"},
    "gan_weight": 1.0,
    "discriminator_iter_start": 20000,
    "adaptive_weight": True,
    "discriminator": {"channels": 64, "num_layers": 3, "norm": "INSTANCE"},
}


#: loss weights: finite and >= 0 (0 switches a term off)
LOSS_WEIGHTS = ("l1_weight", "commitment_weight", "kl_weight", "perceptual_weight", "gan_weight")
PERCEPTUAL_MODES = ("3d", "triplane")


def check_loss(loss: dict[str, Any]) -> None:
    """Refuse loss settings that would train silently wrong: NaN / negative weights, an unknown perceptual mode, a
    negative GAN start (``ValueError`` naming ``loss.<key>``)."""
    for key in LOSS_WEIGHTS:
        check_range(loss[key], f"loss.{key}", min=0)
    mode = loss["perceptual"].get("mode")
    if mode not in PERCEPTUAL_MODES:
        raise ValueError(f"loss.perceptual.mode={mode!r} is invalid; expected one of {', '.join(PERCEPTUAL_MODES)}")
    start = loss["discriminator_iter_start"]
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"loss.discriminator_iter_start={start!r} is invalid; expected an integer >= 0")


def mpr_grid(volume: torch.Tensor) -> torch.Tensor:
    """Middle axial, coronal and sagittal slices side by side.

    Args:
        volume: ``(C, D, H, W)`` in [-1, 1].

    Returns:
        ``(1, max(H, D), W + W + H)`` image in [0, 1] (radiological display, see CLAUDE.md).
    """
    v = volume[0].float().clamp(-1, 1) * 0.5 + 0.5
    d, h, w = v.shape
    views = [v[d // 2], v[:, h // 2, :], v[:, :, w // 2]]  # (H, W), (D, W), (D, H)
    rows = max(t.shape[0] for t in views)
    views = [F.pad(t, (0, 0, 0, rows - t.shape[0])) for t in views]
    return torch.cat(views, dim=1).unsqueeze(0)


def load_stage1_weights(autoencoder: PatchVolumeAutoencoder, path: str) -> None:
    """Copy the autoencoder weights (codebook included) of a stage-1 Lightning checkpoint into ``autoencoder``."""
    from AutoEncoder.checkpoint import autoencoder_state
    from dataset.checkpoint import load_state, read_checkpoint

    ckpt = read_checkpoint(path, "autoencoder")
    load_state(autoencoder, autoencoder_state(ckpt), f"resume_from_checkpoint={path}", "the autoencoder config of this run")


class PatchVolumeModule(L.LightningModule):
    """Trains :class:`PatchVolumeAutoencoder` with L1 + perceptual + commitment (VQ) or KL (KL) + hinge-GAN losses.

    Manual optimisation: each ``training_step`` computes the generator (autoencoder) loss and, once
    ``discriminator_iter_start`` iterations have passed, the discriminator loss; gradients of
    ``accumulate_grad_batches`` consecutive batches are summed (each loss divided by that number) before both
    optimisers step and clip. Note that Lightning's ``global_step`` (and so ``max_steps``) counts every optimiser
    step, G and D alike; the GAN start is measured in iterations (batches; the ``iteration`` buffer, saved with the
    checkpoint) and only changes at the start of an accumulation window.

    Args:
        autoencoder: :class:`PatchVolumeAutoencoder` keyword arguments (a plain dict; saved, so checkpoints
            rebuild the network alone).
        loss: weights and options, merged over :data:`DEFAULT_LOSS`.
        optimizer: factory ``params -> Optimizer`` (Hydra ``_partial_``) used for G and D; default Adam.
        stage: 1 (train everything on patches) or 2 (encoder and codebook frozen, decoder fine-tuned).
        stage1_checkpoint: stage-1 checkpoint to start stage 2 from (required when ``stage == 2``).
        grad_clip: gradient clipping bound for G and D (0 disables clipping): max total norm or max absolute value.
        grad_clip_algorithm: ``"norm"`` (``clip_grad_norm_``) or ``"value"`` (``clip_grad_value_``).
        accumulate_grad_batches: batches whose gradients are accumulated per optimiser step (>= 1). Set this
            instead of ``trainer.accumulate_grad_batches``, which Lightning ignores under manual optimisation.
        lr_warmup_steps: optimiser steps of linear learning-rate warm-up (0: none; at most half of ``lr_decay_steps``
            when that is set), for G and for D (which counts its own steps from the GAN start).
        lr_decay_steps: after the warm-up the learning rate follows a half cosine that reaches ``lr_min_ratio`` of
            its base value at this optimiser step and stays there (0: constant after the warm-up). Counted per
            optimiser, so set it to the number of G steps of the run (``trainer.max_steps`` without the GAN).
        lr_min_ratio: final learning rate of the cosine, as a fraction of the base learning rate.
        log_images: log MPR images of the first validation reconstruction to TensorBoard and W&B (rank zero).
        dataset_info: plain dict describing the data (intensity window, spacing), stored in the checkpoint.
        perceptual_network: a prebuilt feature network (tests); otherwise weights come from ``loss.perceptual``.
    """

    def __init__(
        self,
        autoencoder: dict[str, Any],
        loss: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        stage: int = 1,
        stage1_checkpoint: str | None = None,
        grad_clip: float = 1.0,
        grad_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        lr_warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        lr_min_ratio: float = 0.0,
        log_images: bool = True,
        dataset_info: dict[str, Any] | None = None,
        perceptual_network: nn.Module | None = None,
    ):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage == 2 and not stage1_checkpoint:
            raise ValueError("stage 2 needs stage1_checkpoint: the path of a stage-1 checkpoint (.ckpt)")
        if grad_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"grad_clip_algorithm={grad_clip_algorithm!r}; expected 'norm' or 'value'")
        if int(accumulate_grad_batches) < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if int(lr_warmup_steps) < 0 or int(lr_decay_steps) < 0:
            raise ValueError(f"lr_warmup_steps={lr_warmup_steps} and lr_decay_steps={lr_decay_steps}; expected "
                             "non-negative step counts")
        if not 0.0 <= lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio={lr_min_ratio}; expected a fraction in [0, 1]")
        check_range(grad_clip, "grad_clip", min=0)
        merged = {**DEFAULT_LOSS, **(loss or {})}
        merged["perceptual"] = {**DEFAULT_LOSS["perceptual"], **(merged.get("perceptual") or {})}
        merged["discriminator"] = {**DEFAULT_LOSS["discriminator"], **(merged.get("discriminator") or {})}
        check_loss(merged)
        self.save_hyperparameters(
            {"autoencoder": dict(autoencoder), "loss": merged, "stage": stage, "stage1_checkpoint": stage1_checkpoint,
             "grad_clip": grad_clip, "grad_clip_algorithm": grad_clip_algorithm,
             "accumulate_grad_batches": int(accumulate_grad_batches), "lr_warmup_steps": int(lr_warmup_steps),
             "lr_decay_steps": int(lr_decay_steps), "lr_min_ratio": float(lr_min_ratio), "log_images": log_images,
             "dataset_info": dataset_info}
        )
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.loss_cfg = merged
        self.autoencoder = PatchVolumeAutoencoder(**autoencoder)
        if stage == 2:
            load_stage1_weights(self.autoencoder, str(stage1_checkpoint))
            self.autoencoder.freeze_encoder()
        self.perceptual: nn.Module | None = None
        if merged["perceptual_weight"] > 0:
            self.perceptual = PerceptualLoss(**merged["perceptual"], network=perceptual_network)
        self.discriminator: nn.Module | None = None
        if merged["gan_weight"] > 0:
            self.discriminator = build_discriminator(self.autoencoder.config["in_channels"], **merged["discriminator"])
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.psnr = PSNRMetric(max_val=2.0)

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen pretrained perceptual network out of checkpoints (it comes from its own file)."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("perceptual.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put this module's perceptual weights back so strict loading still checks everything else."""
        from AutoEncoder.checkpoint import LEGACY_KEYS

        for key in LEGACY_KEYS:  # older checkpoints carried the latent statistics as buffers
            checkpoint["state_dict"].pop(f"autoencoder.{key}", None)
        checkpoint["state_dict"].update({k: v for k, v in self.state_dict().items() if k.startswith("perceptual.")})

    def setup(self, stage: str) -> None:
        """Reject strategies this module cannot train under (before any weight is wrapped or moved)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                "trainer=fsdp is not supported for the autoencoder: its manual G/D steps clip by norm and take "
                "gradients of the decoder's last layer, which FSDP shards; use trainer=ddp (FSDP is for train_BiFlowNet)"
            )
        # the discriminator and perceptual network in the autoencoder's NDHWC layout (see PatchVolumeAutoencoder)
        self.to(memory_format=torch.channels_last_3d)

    # ------------------------------------------------------------------------------------------ optimisers
    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier after ``step`` optimiser steps: linear warm-up, then constant or half cosine."""
        warm, decay, floor = self.hparams.lr_warmup_steps, self.hparams.lr_decay_steps, self.hparams.lr_min_ratio
        if decay > 0:
            warm = min(warm, decay // 2)  # a short run keeps the same shape: at most half of it warms up
        if step < warm:
            return (step + 1) / warm
        if decay <= 0:
            return 1.0
        progress = min(1.0, (step - warm) / (decay - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def configure_optimizers(self) -> Any:
        """Adam-like optimiser for the trainable autoencoder parameters, and one for the discriminator; with a
        warm-up or decay, one ``LambdaLR`` per optimiser as well (stepped in :meth:`training_step`)."""
        make = self.optimizer_factory or (lambda p: torch.optim.Adam(p, lr=1e-4, betas=(0.5, 0.9)))
        opts = [make([p for p in self.autoencoder.parameters() if p.requires_grad])]
        if self.discriminator is not None:
            opts.append(make(self.discriminator.parameters()))
        if self.hparams.lr_warmup_steps == 0 and self.hparams.lr_decay_steps == 0:
            return opts
        return opts, [torch.optim.lr_scheduler.LambdaLR(o, lambda step: self.lr_factor(step)) for o in opts]

    def _step(self, index: int, optimizer: Any) -> None:
        """Clip, step optimiser ``index`` (0: G, 1: D) and its learning-rate schedule if there is one."""
        self._clip(optimizer)
        optimizer.step()
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            (schedulers if isinstance(schedulers, list) else [schedulers])[index].step()

    def _gan_active(self, iteration: int) -> bool:
        return self.discriminator is not None and iteration >= self.loss_cfg["discriminator_iter_start"]

    # ------------------------------------------------------------------------------------------- training
    def _clip(self, optimizer: Any) -> None:
        if self.hparams.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip,
                                gradient_clip_algorithm=self.hparams.grad_clip_algorithm)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Generator and (once the GAN has started) discriminator losses on ``batch["ct"]``; both optimisers step
        after every ``accumulate_grad_batches`` batches."""
        x = batch["ct"]
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opt_g = opts[0]
        cfg = self.loss_cfg
        accumulate = self.hparams.accumulate_grad_batches
        position = int(self.iteration) % accumulate
        first, last = position == 0, position == accumulate - 1
        # the GAN switches on only at a window start, so a window never steps D on part of its batches
        gan = self._gan_active(int(self.iteration) - position)

        self.toggle_optimizer(opt_g)
        out = self.autoencoder(x)
        rec = out.reconstruction
        l1 = (rec - x).abs().mean()
        nll = cfg["l1_weight"] * l1
        logs = {"train/l1": l1.detach()}
        if self.perceptual is not None:
            perc = self.perceptual(rec, x)
            nll = nll + cfg["perceptual_weight"] * perc
            logs["train/perceptual"] = perc.detach()
        loss_g = nll + cfg["commitment_weight"] * out.commitment_loss + cfg["kl_weight"] * out.kl_loss
        if gan:
            g_adv = hinge_g_loss(self.discriminator(rec)[-1])
            weight = torch.ones((), device=x.device)
            if cfg["adaptive_weight"]:
                weight = adaptive_weight(nll, g_adv, self.autoencoder.decoder.last_layer)
            loss_g = loss_g + cfg["gan_weight"] * weight * g_adv
            logs.update({"train/g_adv": g_adv.detach(), "train/adaptive_weight": weight})
        if first:
            opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g / accumulate)
        if last:
            self._step(0, opt_g)
        self.untoggle_optimizer(opt_g)

        if gan:
            opt_d = opts[1]
            self.toggle_optimizer(opt_d)
            loss_d = hinge_d_loss(self.discriminator(x)[-1], self.discriminator(rec.detach())[-1])
            if first:
                opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d / accumulate)
            if last:
                self._step(1, opt_d)
            self.untoggle_optimizer(opt_d)
            logs["train/d_loss"] = loss_d.detach()

        self.iteration += 1
        logs.update({
            "train/loss_g": loss_g.detach(), "train/commitment": out.commitment_loss.detach(),
            "train/perplexity": out.perplexity.detach(), "train/codebook_usage": out.usage.detach(),
            "train/lr": torch.tensor(opt_g.param_groups[0]["lr"]),
        })
        if self.autoencoder.bottleneck == "kl":
            logs["train/kl"] = out.kl_loss.detach()
        self.log_dict(logs, prog_bar=False, batch_size=x.shape[0])
        self.log("train/rec_l1", l1.detach(), prog_bar=True, batch_size=x.shape[0])
        return loss_g.detach()

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Reconstruct whole volumes; log ``val/psnr`` (dB, data range 2) and ``val/l1``; MPR images once."""
        x = batch["ct"]
        rec = self.autoencoder(x).reconstruction.clamp(-1, 1)
        psnr = self.psnr(rec.float(), x.float()).mean()
        self.psnr.reset()
        self.log("val/psnr", psnr, sync_dist=True, prog_bar=True, batch_size=x.shape[0])
        self.log("val/l1", (rec - x).abs().mean(), sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and self.hparams.log_images and self.trainer.is_global_zero:
            self._log_mpr(x[0], rec[0])

    def _log_mpr(self, x: torch.Tensor, rec: torch.Tensor) -> None:
        """MPR grid of input (top) and reconstruction (bottom) to every logger that takes images."""
        image = torch.cat([mpr_grid(x), mpr_grid(rec)], dim=1).cpu()  # (C, H, W)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/mpr_input_vs_reconstruction", image, self.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("val/mpr_input_vs_reconstruction", [image[0].numpy()], step=self.global_step)
