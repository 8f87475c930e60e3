"""Train BiFlowNet on precomputed latents (thin entry point; the work is in `ddpm`).

    python -m train.train_BiFlowNet experiment=biflownet_tiny
    python -m train.train_BiFlowNet experiment=biflownet_lora init_from=base.ckpt paths.data_dir=/new/site
    torchrun --nproc_per_node=8 -m train.train_BiFlowNet experiment=biflownet_base
    torchrun --nproc_per_node=2 -m train.train_BiFlowNet experiment=biflownet_tiny trainer=ddp_cpu
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.errors import InstantiationException
from omegaconf import DictConfig, open_dict

from ddpm.biflownet_module import NonFiniteLossError
from ddpm.loading import read_network_config
from dataset.xray_harmonization import IntensityReference
from ddpm.preflight import check_training_inputs, read_latent_stats
from train.common import instantiate_group, resolve_ckpt_path


def world_size(trainer_cfg: DictConfig) -> int:
    """Number of training processes: torchrun's WORLD_SIZE, else devices x nodes from the trainer config."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    devices = trainer_cfg.get("devices", 1)
    per_node = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else 1
    return max(per_node, 1) * int(trainer_cfg.get("num_nodes", 1))


def run(cfg: DictConfig) -> dict:
    """Build datamodule, module, callbacks, loggers and trainer from ``cfg``; fit; report where things went."""
    L.seed_everything(int(cfg.seed), workers=True)
    world = world_size(cfg.trainer)
    if cfg.global_batch_size % world:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not divisible by the world size {world}")
    if cfg.get("init_from"):
        # fine-tuning: the base checkpoint defines the architecture; only runtime settings come from the config
        base_net = read_network_config(cfg.init_from)
        base_net["grad_checkpointing"] = bool(cfg.network.get("grad_checkpointing", False))
        with open_dict(cfg):
            cfg.network = base_net
    net = cfg.network
    xray_size = net.xray.image_size if net.get("xray") else None
    check_training_inputs(cfg.data.manifest, net.in_channels, net.latent_shape, xray_size)
    stats = read_latent_stats(cfg.latent_stats) if cfg.latent_stats else None
    xray_stats = IntensityReference.from_manifest(cfg.data.manifest).to_dict() if xray_size is not None else None

    datamodule = hydra.utils.instantiate(cfg.data, batch_size=cfg.global_batch_size // world, _convert_="all")
    try:
        module = hydra.utils.instantiate(cfg.module, latent_stats=stats, xray_stats=xray_stats, _convert_="all")
    except InstantiationException as e:
        # bad settings (e.g. a LoRA pattern that matches nothing, a missing init_from) are input errors
        if isinstance(e.__cause__, (ValueError, FileNotFoundError)):
            raise e.__cause__ from None
        raise
    trainable, total = module.trainable_counts()
    if module.lora_settings is not None:
        from ddpm.lora import describe_counts

        print(describe_counts(trainable, total), flush=True)
    callbacks = instantiate_group(cfg, "callbacks")
    loggers = instantiate_group(cfg, "logger")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    checkpoint_dir = Path(cfg.callbacks.checkpoint.dirpath)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, checkpoint_dir))
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
    """Hydra wrapper: bad input -> one line on stderr, exit 2; non-finite loss -> exit 3."""
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_BiFlowNet: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"train_BiFlowNet: error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
