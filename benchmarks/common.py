"""Timing and memory helpers shared by the benchmark scripts (each script prints one JSON object)."""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from AutoEncoder import PatchVolumeAutoencoder
    from evaluation.generation import CTGenerator


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls in seconds (other processes may share the CPU)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Warm up once, then time ``repeats`` calls; peak GPU memory on CUDA, peak process RSS on CPU.

    Returns:
        ``time_s`` (fastest), ``time_s_mean`` and ``peak_gpu_mib`` or ``peak_rss_mib`` / ``peak_rss_growth_mib``.
    """
    fn()  # warm-up (allocator, kernels, codebook initialisation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mib()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = {"time_s": min(times), "time_s_mean": sum(times) / len(times)}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mib"] = peak_rss_mib()
        out["peak_rss_growth_mib"] = peak_rss_mib() - rss0
    return out


def environment(device: torch.device) -> dict:
    """Date, device, threads and commit, to stamp every benchmark record."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": name,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit}


# ---------------------------------------------------------------------------------------------- presets
CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The Hydra config a training entry point would see for ``overrides`` (no run directory is made)."""
    import hydra

    with hydra.initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra.compose(config_name, overrides=list(overrides))


def plain(cfg: object) -> dict:
    """A resolved config node as plain dicts and lists (what networks and checkpoints take)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def network_for(network: dict, latent_edge: int) -> dict:
    """BiFlowNet keyword arguments of a preset resized to a cubic ``latent_edge`` grid.

    The X-ray edge scales with the latent (the presets pair 32^3 latents with 256^2 X-rays), rounded to a
    whole number of X-ray patches; every other setting stays as the preset has it.
    """
    net = {**network, "latent_shape": [latent_edge] * 3}
    if net.get("xray"):
        xray = dict(net["xray"])
        edge0, size0, patch = int(network["latent_shape"][0]), int(xray["image_size"][0]), int(xray["patch_size"])
        size = max(patch, round(size0 * latent_edge / edge0 / patch) * patch)
        net["xray"] = {**xray, "image_size": [size, size]}
    return net


def xray_size(network: dict) -> int | None:
    """Square X-ray edge of a BiFlowNet configuration, or None without X-ray conditioning."""
    return int(network["xray"]["image_size"][0]) if network.get("xray") else None


def random_generator(autoencoder: PatchVolumeAutoencoder, network: dict, process: dict, device: torch.device,
                     bf16: bool) -> CTGenerator:
    """A :class:`CTGenerator` around randomly initialised networks (latency and memory do not depend on weights).

    Args:
        autoencoder: the autoencoder (its latent channels must equal ``network["in_channels"]``).
        network: BiFlowNet keyword arguments (see :func:`network_for`).
        process: Diffusion keyword arguments.
        device: where sampling runs.
        bf16: bf16 autocast (CUDA only, as in generation).
    """
    from dataset import HUWindow
    from ddpm import BiFlowNet, Diffusion, LoadedBiFlowNet
    from evaluation.generation import CTGenerator

    if int(network["in_channels"]) != autoencoder.latent_channels:
        raise ValueError(f"network in_channels={network['in_channels']} but the autoencoder makes "
                         f"{autoencoder.latent_channels}-channel latents")
    model = BiFlowNet(**{**network, "grad_checkpointing": False}).eval().requires_grad_(False).to(device)  # no training
    c = autoencoder.latent_channels
    xr = model.xray_encoder
    conditioning = {
        "num_classes": model.num_classes, "xray_size": list(xr.image_size) if xr is not None else None,
        "cross_attention": model.cross_attention, "back_projection": model.back_projection,
        "latent_shape": list(model.latent_shape), "latent_channels": c, "p_uncond": None, "step": 0,
        "adapter": None,
    }
    loaded = LoadedBiFlowNet(model=model, diffusion=Diffusion(**process),
                             latent_mean=torch.zeros(1, c, 1, 1, 1, device=device),
                             latent_std=torch.ones(1, c, 1, 1, 1, device=device),
                             conditioning=conditioning, hparams={"network": network, "diffusion": process})
    return CTGenerator(loaded, autoencoder.eval().requires_grad_(False).to(device), HUWindow(), (1.0, 1.0, 1.0),
                       device, bf16)


def import_official(path: Path, stubs: dict[str, dict]) -> object:
    """Import one file of the official 3D MedDiffusion by path, for side-by-side timing (never copied here).

    ``stubs`` maps module names that file imports but the timed classes never use (training-only
    dependencies, helpers of its own package that would clash with ours) to the attributes a stand-in
    module gets; the stand-ins are installed for the import only and the previous ``sys.modules``
    entries are put back afterwards.
    """
    import importlib.util
    import sys
    import types

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a checkout of the official 3D MedDiffusion")
    saved = {name: sys.modules.get(name) for name in stubs}
    try:
        for name, attrs in stubs.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            module.__path__ = []  # also a package, so that dotted children resolve
            sys.modules[name] = module
        spec = importlib.util.spec_from_file_location(f"official_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def einops_exts_stub() -> dict:
    """Attributes of a stand-in ``einops_exts`` (an import-only dependency of the official files)."""
    from einops import rearrange

    return {"rearrange_many": lambda tensors, pattern, **kw: [rearrange(t, pattern, **kw) for t in tensors],
            "check_shape": lambda *args, **kw: None}
