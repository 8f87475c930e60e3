"""Every Hydra config file parses, and the shared trainer presets build a lightning.Trainer."""

from pathlib import Path

import hydra
import lightning
import pytest
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_yaml_parses(path: Path) -> None:
    OmegaConf.load(path)


@pytest.mark.parametrize("preset", ["default", "cpu"])
def test_trainer_presets_instantiate(preset: str, tmp_path: Path) -> None:
    with hydra.initialize_config_dir(str(CONFIG_DIR / "trainer"), version_base="1.3"):
        cfg = hydra.compose(preset)
    cfg.default_root_dir = str(tmp_path)
    cfg.accelerator = "cpu"
    trainer = hydra.utils.instantiate(cfg, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, lightning.Trainer)
    assert trainer.default_root_dir == str(tmp_path)
