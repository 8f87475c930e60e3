"""Train the patch-volume autoencoder, stage 1 or 2 (thin entry point; the work is in `AutoEncoder`).

    python -m train.train_PatchVolume experiment=ae_tiny paths.data_dir=outputs/demo/data
    python -m train.train_PatchVolume experiment=ae_8x_stage2 resume_from_checkpoint=/path/stage1.ckpt
    torchrun --nproc_per_node=2 -m train.train_PatchVolume experiment=ae_tiny trainer=ddp_cpu
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from dataset import DatasetInfo
from train.common import instantiate_group, resolve_ckpt_path


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Build datamodule, module, callbacks, loggers and trainer from ``cfg``; fit; report where things went.

    ``callbacks`` are added to the configured ones (``train.tune`` passes its trial reporter here).
    """
    L.seed_everything(int(cfg.seed), workers=True)
    manifest = Path(cfg.data.manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest.csv; prepare a dataset first (python -m dataset.prepare)")
    if cfg.stage == 2 and cfg.resume_from_checkpoint and not Path(cfg.resume_from_checkpoint).is_file():
        raise FileNotFoundError(f"{cfg.resume_from_checkpoint}: resume_from_checkpoint (stage-1 checkpoint) does not exist")
    info = DatasetInfo.load(manifest.parent).to_dict() if (manifest.parent / "dataset.json").is_file() else None

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = hydra.utils.instantiate(cfg.module, dataset_info=info, _convert_="all")
    callbacks = [*instantiate_group(cfg, "callbacks"), *callbacks]
    loggers = instantiate_group(cfg, "logger")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("strategy") == "ddp":
        # G and D are stepped by separate backward passes, each leaving the other network's parameters unused
        trainer_cfg["strategy"] = "ddp_find_unused_parameters_true"
    trainer: L.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, _convert_="all")
    checkpoint_dir = Path(cfg.callbacks.checkpoint.dirpath)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, checkpoint_dir))
    return {
        "global_step": trainer.global_step,
        "iteration": int(module.iteration),
        "checkpoint_dir": str(checkpoint_dir),
        "last_checkpoint": str(checkpoint_dir / "last.ckpt"),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }


@hydra.main(config_path="../config", config_name="train_PatchVolume", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper: bad input -> one line on stderr, exit 2."""
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_PatchVolume: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
