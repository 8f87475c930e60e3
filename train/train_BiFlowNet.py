"""Train BiFlowNet on precomputed latents (thin entry point; the work is in `ddpm`).

    python -m train.train_BiFlowNet experiment=biflownet_tiny
    python -m train.train_BiFlowNet experiment=biflownet_lora init_from=base.ckpt paths.data_dir=/new/site
    torchrun --nproc_per_node=8 -m train.train_BiFlowNet experiment=biflownet_base
    torchrun --nproc_per_node=2 -m train.train_BiFlowNet experiment=biflownet_tiny trainer=ddp_cpu
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from dataset.cli import hydra_entry, hydra_task, quiet_libraries
from dataset.latents import check_latent_origin
from dataset.manifest import Manifest
from ddpm.diffusion import Diffusion
from ddpm.loading import read_network_config
from ddpm.memory import grad_checkpointing_for
from dataset.xray_harmonization import IntensityReference
from ddpm.preflight import check_training_inputs, read_latent_stats
from dataset.checkpoint import read_checkpoint
from train.common import (FiniteWeights, ProgressReport, RunConfigWriter, RunState, build_trainer,
                          check_finite_checkpoint, check_resume, check_run_config, config_int, configure_threads,
                          data_identity, instantiate, instantiate_group, resolve_ckpt_path)

PROG = "python -m train.train_BiFlowNet"


def world_size(trainer_cfg: DictConfig) -> int:
    """Number of training processes: torchrun's WORLD_SIZE, else devices x nodes from the trainer config."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    devices = trainer_cfg.get("devices", 1)
    per_node = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else 1
    return max(per_node, 1) * int(trainer_cfg.get("num_nodes", 1))


def per_rank_batch(global_batch: int, world: int, n_train: int, drop_last: bool, manifest: object) -> int:
    """The batch each rank loads; lowered (with a warning) when the training split holds no full batch.

    With ``drop_last`` a split smaller than the per-rank batch would give zero training batches, so the
    run would end having trained nothing; instead every rank trains on ``n_train // world`` samples per
    batch and says so.

    Raises:
        ValueError: fewer training subjects than ranks, or a global batch not divisible by the ranks.
    """
    if global_batch < 1 or global_batch % world:
        raise ValueError(f"global_batch_size={global_batch} is not divisible by the world size {world}; expected a "
                         "positive multiple of it")
    if n_train < world:
        raise ValueError(f"{manifest}: {n_train} training subjects for {world} ranks (global_batch_size="
                         f"{global_batch}); every rank needs at least one subject")
    batch = global_batch // world
    if drop_last and n_train // world < batch:
        lowered = n_train // world
        print(f"{PROG}: warning: {n_train} training subjects hold no full batch of global_batch_size={global_batch} "
              f"on {world} rank(s); training with batch {lowered} per rank (global {lowered * world})",
              file=sys.stderr, flush=True)
        return lowered
    return batch


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Build datamodule, module, callbacks, loggers and trainer from ``cfg``; fit; report where things went.

    ``callbacks`` are added to the configured ones (``train.tune`` passes its trial reporter here).
    """
    configure_threads(cfg.get("threads", "auto"))
    check_run_config(cfg)
    global_batch = config_int(cfg.global_batch_size, "global_batch_size", min=1)
    timesteps = config_int(cfg.process.get("num_train_timesteps"), "process.num_train_timesteps", min=1)
    config_int(cfg.module.get("val_sample_steps", 0), "module.val_sample_steps", min=0, max=timesteps,
               hint=" (process.num_train_timesteps at most)")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    world = world_size(cfg.trainer)
    if cfg.get("init_from"):
        check_finite_checkpoint(read_checkpoint(cfg.init_from, "biflownet", mmap=True), f"init_from={cfg.init_from}",
                                "expected a trained BiFlowNet checkpoint with finite weights", keys=("state_dict",))
        # fine-tuning: the base checkpoint defines the architecture; only runtime settings come from the config
        base_net = read_network_config(cfg.init_from)
        base_net["grad_checkpointing"] = cfg.network.get("grad_checkpointing", False)
        with open_dict(cfg):
            cfg.network = base_net
    net = cfg.network
    xray_size = net.xray.image_size if net.get("xray") else None
    check_training_inputs(cfg.data.manifest, net.in_channels, net.latent_shape, xray_size)
    stats = read_latent_stats(cfg.latent_stats) if cfg.latent_stats else None
    if stats is not None:  # every latent must come from the autoencoder the statistics name
        check_latent_origin(Manifest.load(cfg.data.manifest, check_files=False).frame["latent"], stats, cfg.latent_stats)
    identity = data_identity(cfg.data.manifest, {"latent_autoencoder": stats.ae_fingerprint if stats else None})
    batch = per_rank_batch(global_batch, world, identity["train_subjects"],
                           bool(cfg.data.get("drop_last", False)), cfg.data.manifest)

    strategy = cfg.trainer.get("strategy")
    if str(net.get("grad_checkpointing")) == "auto" and OmegaConf.is_dict(strategy) and \
            strategy.get("activation_checkpointing_policy") is not None:
        recompute, note = False, "network.grad_checkpointing=auto: off, the trainer strategy checkpoints the blocks itself"
    else:
        recompute, note = grad_checkpointing_for(OmegaConf.to_container(net, resolve=True), batch,
                                                 str(cfg.trainer.get("accelerator", "auto")))
    if note and int(os.environ.get("RANK", "0") or 0) == 0:
        print(note, flush=True)
    with open_dict(cfg):
        cfg.network.grad_checkpointing = recompute

    checkpoint_dir = Path(cfg.callbacks.checkpoint.dirpath)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, checkpoint_dir)
    if ckpt_path is not None:
        lora = cfg.module.get("lora")
        check_resume(ckpt_path, "biflownet", identity,
                     {"network": OmegaConf.to_container(net, resolve=True),
                      "lora": OmegaConf.to_container(lora, resolve=True) if lora is not None else None,
                      "diffusion": OmegaConf.to_container(cfg.module.diffusion, resolve=True)},
                     cfg.run_name, normalize={"diffusion": Diffusion.training_identity})
    xray_stats = IntensityReference.from_manifest(cfg.data.manifest).to_dict() if xray_size is not None else None

    datamodule = instantiate(cfg.data, batch_size=batch)
    module = instantiate(cfg.module, latent_stats=stats.to_dict() if stats else None, xray_stats=xray_stats)
    trainable, total = module.trainable_counts()
    if module.lora_settings is not None:
        from ddpm.lora import describe_counts

        print(describe_counts(trainable, total), flush=True)
    callbacks = [*instantiate_group(cfg, "callbacks"), RunState(identity, int(cfg.seed)), FiniteWeights(ckpt_path),
                 ProgressReport(checkpoint_dir), RunConfigWriter(cfg, cfg.paths.output_dir), *callbacks]
    trainer = build_trainer(cfg.trainer, callbacks, instantiate_group(cfg, "logger"))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return {
        "global_step": trainer.global_step,
        "checkpoint_dir": str(checkpoint_dir),
        "last_checkpoint": str(checkpoint_dir / "last.ckpt"),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter_dir": module.adapter_dir if module.lora_settings is not None else None,
    }


@hydra.main(config_path="../config", config_name="train_BiFlowNet", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper: bad input -> one line on stderr, exit 2; non-finite loss or weights -> exit 3; Ctrl-C -> 130."""
    quiet_libraries()
    hydra_task(PROG, lambda: run(cfg) and None, output_dir=cfg.paths.output_dir)


if __name__ == "__main__":
    hydra_entry(main, PROG)
