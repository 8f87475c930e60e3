"""Hydra configs: every experiment composes for its entry point, names existing presets and builds its network
(shrunk to a tiny size); every option of every config group composes; the shared trainer presets build a Trainer."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

# experiment -> entry-point config
EXPERIMENTS = {
    "ae_tiny": "train_PatchVolume",
    "ae_kl_tiny": "train_PatchVolume",
    "ae_4x_stage1": "train_PatchVolume",
    "ae_4x_stage2": "train_PatchVolume",
    "ae_8x_stage1": "train_PatchVolume",
    "ae_8x_stage2": "train_PatchVolume",
    "ae_kl_8x_stage1": "train_PatchVolume",
    "ae_kl_8x_stage2": "train_PatchVolume",
    "demo_autoencoder": "train_PatchVolume",
    "biflownet_tiny": "train_BiFlowNet",
    "biflownet_base": "train_BiFlowNet",
    "biflownet_class": "train_BiFlowNet",
    "biflownet_lora": "train_BiFlowNet",
    "demo_biflownet": "train_BiFlowNet",
}
# the only values an experiment may leave for the command line (???): the checkpoint it starts from
MAY_BE_REQUIRED = {"resume_from_checkpoint", "init_from"}
# the preset group each entry point builds its network from
NETWORK_GROUP = {"train_PatchVolume": "autoencoder", "train_BiFlowNet": "diffusion/network@network"}


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    with hydra.initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra.compose(config_name, overrides=overrides, return_hydra_config=True)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _resolved(cfg: DictConfig, given: dict[str, str] | None = None) -> dict:
    """The config without Hydra's own node, ``given`` values set, every interpolation resolved (raises on a
    broken one or a value still missing)."""
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    for key, value in (given or {}).items():
        OmegaConf.update(body, key, value)
    return OmegaConf.to_container(body, resolve=True, throw_on_missing=True)


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _tiny_autoencoder(cfg: dict) -> torch.nn.Module:
    """The configured autoencoder with its structure (levels, bottleneck, codebook settings) but 8 channels."""
    from AutoEncoder import PatchVolumeAutoencoder

    levels = len(cfg["channels"])
    factor = 2 ** (levels - 1)
    tiny = {**cfg, "channels": [8] * levels, "num_groups": 4, "num_res_blocks": 1, "patch_size": 2 * factor,
            "attention_heads": min(int(cfg["attention_heads"]), 1), "n_codes": min(int(cfg["n_codes"]), 16)}
    return PatchVolumeAutoencoder(**tiny)


def _tiny_biflownet(cfg: dict) -> torch.nn.Module:
    """The configured BiFlowNet (levels, conditioning modes, classes) at 8 channels on the smallest latent."""
    from ddpm import BiFlowNet

    size = max(2 ** (len(cfg["channel_mults"]) - 1), int(cfg["sub_volume"]))
    tiny = {**cfg, "latent_shape": [size] * 3, "model_channels": 8, "norm_groups": 4, "dit_heads": 2,
            "grad_checkpointing": False}
    if cfg.get("xray"):
        tiny["xray"] = {**cfg["xray"], "image_size": [16, 16], "patch_size": 8, "dim": 8, "num_heads": 2,
                        "depth": min(int(cfg["xray"]["depth"]), 1)}
    return BiFlowNet(**tiny)


def _forward_biflownet(net: torch.nn.Module, cfg: dict) -> torch.Tensor:
    c, d = int(cfg["in_channels"]), net.latent_shape[0]
    kw = {"y": torch.tensor([1])} if cfg["num_classes"] else {}
    if cfg.get("xray"):
        kw.update(ap=torch.rand(1, 1, 16, 16), lat=torch.rand(1, 1, 16, 16))
    with torch.no_grad():
        return net(torch.randn(1, c, d, d, d), torch.tensor([5]), **kw)


def test_every_experiment_file_is_listed() -> None:
    assert sorted(EXPERIMENTS) == _options("experiment")


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_composes_names_presets_and_builds_its_network(experiment: str) -> None:
    entry = EXPERIMENTS[experiment]
    cfg = _compose(entry, [f"experiment={experiment}"])
    # only the starting checkpoint may be left to the command line; any other ??? fails in _resolved
    required = [key for key in MAY_BE_REQUIRED if key in cfg.keys() and OmegaConf.is_missing(cfg, key)]
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    assert choices["experiment"] == experiment
    for key, option in choices.items():  # every chosen group option is a file of that group
        group = key.split("@")[0]
        if option is not None and not group.startswith("hydra/"):
            assert (CONFIG_DIR / group / f"{option}.yaml").is_file(), (key, option)
    assert choices[NETWORK_GROUP[entry]] in _options(NETWORK_GROUP[entry].split("@")[0])
    body = _resolved(cfg, {key: "given.ckpt" for key in required})
    assert body["task_name"] == entry and body["run_name"] != "default"  # its own run folder
    for target in _targets(body):
        hydra.utils.get_object(target)  # every _target_ imports

    if entry == "train_PatchVolume":
        net = _tiny_autoencoder(body["module"]["autoencoder"])
        x = torch.rand(1, 1, net.patch_size, net.patch_size, net.patch_size) * 2 - 1
        with torch.no_grad():
            assert net(x).reconstruction.shape == x.shape
        assert body["stage"] in (1, 2) and (body["stage"] == 2) == (body["data"]["patch_size"] is None)
    else:
        net_cfg = body["module"]["network"]
        assert net_cfg == body["network"]
        net = _tiny_biflownet(net_cfg)
        out = _forward_biflownet(net, net_cfg)
        assert out.shape[1:] == (net_cfg["in_channels"], *net.latent_shape)
        assert "latent" in body["data"]["load"]
        if net_cfg.get("xray"):
            assert {"ap", "lat"} <= set(body["data"]["load"])
        if body["module"].get("lora"):
            from ddpm.lora import LoraSettings, apply_lora

            adapted = apply_lora(net, LoraSettings.from_dict(body["module"]["lora"]))
            assert any("lora_" in name and p.requires_grad for name, p in adapted.named_parameters())


# group -> the entry-point config that uses it and how an option is selected there
GROUPS = {
    "paths": ("train_BiFlowNet", "paths={}"),
    "trainer": ("train_BiFlowNet", "trainer={}"),
    "logger": ("train_BiFlowNet", "logger={}"),
    "optimizer": ("train_BiFlowNet", "optimizer={}"),
    "data": ("train_PatchVolume", "data={}"),  # but the latents option is train_BiFlowNet's
    "debug": ("train_PatchVolume", "debug={}"),
    "autoencoder": ("train_PatchVolume", "autoencoder={}"),
    "diffusion/network": ("train_BiFlowNet", "diffusion/network@network={}"),
    "diffusion/process": ("train_BiFlowNet", "diffusion/process@process={}"),
    "lora": ("train_BiFlowNet", "+lora@module.lora={}"),
    "search_space": ("tune", "search_space={}"),
}
GROUP_OPTIONS = [(group, option) for group in GROUPS for option in _options(group)]


def test_every_config_group_is_covered() -> None:
    groups = {str(p.parent.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml") if p.parent != CONFIG_DIR}
    assert groups - {"experiment"} == set(GROUPS)


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group: str, option: str) -> None:
    entry, pattern = GROUPS[group]
    if (group, option) == ("data", "latents"):
        entry = "train_BiFlowNet"
    extra = ["target=biflownet", "study_name=s"] if entry == "tune" else []
    cfg = _compose(entry, [pattern.format(option), *extra])
    key = pattern.split("=")[0].lstrip("+")
    assert OmegaConf.to_container(cfg.hydra.runtime.choices)[key] == option
    body = _resolved(cfg)
    for target in _targets(body):
        hydra.utils.get_object(target)
    if group == "autoencoder":
        _tiny_autoencoder(body["autoencoder"])
    elif group == "diffusion/network":
        net = _tiny_biflownet(body["network"])
        assert _forward_biflownet(net, body["network"]).shape[2:] == tuple(net.latent_shape)
    elif group == "diffusion/process":
        from ddpm import Diffusion

        hparams = Diffusion(**body["process"]).hparams()
        assert {k: hparams[k] for k in body["process"]} == body["process"]
    elif group == "optimizer":
        optimizer = hydra.utils.instantiate(cfg.optimizer)(torch.nn.Linear(2, 2).parameters())
        assert isinstance(optimizer, torch.optim.Optimizer)
    elif group == "lora":
        from ddpm.lora import LoraSettings

        assert LoraSettings.from_dict(body["module"]["lora"]).target_modules
    elif group == "search_space":
        from train.tune import parse_search_space

        train = _compose(body["targets"][option]["config"], [])
        assert parse_search_space(cfg.search_space, train, body["targets"][option]["config"])


@pytest.mark.parametrize("preset", ["default", "cpu"])
def test_trainer_presets_instantiate(preset: str, tmp_path: Path) -> None:
    with hydra.initialize_config_dir(str(CONFIG_DIR / "trainer"), version_base="1.3"):
        cfg = hydra.compose(preset)
    cfg.default_root_dir = str(tmp_path)
    cfg.accelerator = "cpu"
    trainer = hydra.utils.instantiate(cfg, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, lightning.Trainer)
    assert trainer.default_root_dir == str(tmp_path)
