"""Train the patch-volume autoencoder, stage 1 or 2 (thin entry point; the work is in `AutoEncoder`).

    python -m train.train_PatchVolume experiment=ae_tiny paths.data_dir=outputs/demo/data
    python -m train.train_PatchVolume experiment=ae_8x_stage2 resume_from_checkpoint=/path/stage1.ckpt
    torchrun --nproc_per_node=2 -m train.train_PatchVolume experiment=ae_tiny trainer=ddp_cpu
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from dataset import DatasetInfo
from dataset.checkpoint import read_checkpoint
from dataset.cli import hydra_entry, hydra_task, quiet_libraries
from train.common import (FiniteWeights, ProgressReport, RunConfigWriter, RunState, build_trainer,
                          check_finite_checkpoint, check_resume, check_run_config, config_int, configure_threads,
                          data_identity, instantiate, instantiate_group, resolve_ckpt_path)

PROG = "python -m train.train_PatchVolume"


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Build datamodule, module, callbacks, loggers and trainer from ``cfg``; fit; report where things went.

    ``callbacks`` are added to the configured ones (``train.tune`` passes its trial reporter here).
    """
    configure_threads(cfg.get("threads", "auto"))
    check_run_config(cfg)
    config_int(cfg.data.get("batch_size"), "data.batch_size", min=1)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    manifest = Path(cfg.data.manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest.csv; prepare a dataset first (python -m dataset.prepare)")
    if cfg.stage not in (1, 2):
        raise ValueError(f"stage={cfg.stage!r} is invalid; expected 1 or 2")
    if cfg.stage == 1 and cfg.resume_from_checkpoint:
        raise ValueError(f"resume_from_checkpoint={cfg.resume_from_checkpoint} is the stage-1 checkpoint that "
                         "stage=2 starts from; stage 1 would ignore it (to continue a run use ckpt_path=...)")
    if cfg.stage == 2:
        if not cfg.resume_from_checkpoint:
            raise ValueError("stage=2 needs resume_from_checkpoint=<stage-1 checkpoint (.ckpt)>")
        # one line for a bad file, before any work
        check_finite_checkpoint(read_checkpoint(cfg.resume_from_checkpoint, "autoencoder", mmap=True),
                                f"resume_from_checkpoint={cfg.resume_from_checkpoint}",
                                "expected a stage-1 checkpoint with finite weights (an earlier one of that run)",
                                keys=("state_dict",))
    info = DatasetInfo.load(manifest.parent).to_dict() if (manifest.parent / "dataset.json").is_file() else None

    checkpoint_dir = Path(cfg.callbacks.checkpoint.dirpath)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, checkpoint_dir)
    identity = data_identity(manifest)
    if ckpt_path is not None:
        check_resume(ckpt_path, "autoencoder", identity,
                     {"autoencoder": OmegaConf.to_container(cfg.autoencoder, resolve=True), "stage": int(cfg.stage)},
                     cfg.run_name)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, dataset_info=info)
    callbacks = [*instantiate_group(cfg, "callbacks"), RunState(identity, int(cfg.seed)), FiniteWeights(ckpt_path),
                 ProgressReport(checkpoint_dir), RunConfigWriter(cfg, cfg.paths.output_dir), *callbacks]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("strategy") == "ddp":
        # G and D are stepped by separate backward passes, each leaving the other network's parameters unused
        trainer_cfg["strategy"] = "ddp_find_unused_parameters_true"
    trainer = build_trainer(trainer_cfg, callbacks, instantiate_group(cfg, "logger"))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return {
        "global_step": trainer.global_step,
        "iteration": int(module.iteration),
        "checkpoint_dir": str(checkpoint_dir),
        "last_checkpoint": str(checkpoint_dir / "last.ckpt"),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }


@hydra.main(config_path="../config", config_name="train_PatchVolume", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra wrapper: bad input -> one line on stderr, exit 2; non-finite weights -> exit 3; Ctrl-C -> 130."""
    quiet_libraries()
    hydra_task(PROG, lambda: run(cfg) and None, output_dir=cfg.paths.output_dir)


if __name__ == "__main__":
    hydra_entry(main, PROG)
