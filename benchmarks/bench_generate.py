"""Latency and peak memory of generating one CT volume from an X-ray pair (sampling + decoding), without and
with projection-consistency guidance, side by side in one run.

    python -m benchmarks.bench_generate --size 64 --ae-preset tiny --network tiny --steps 25
    python -m benchmarks.bench_generate --size 256 --ae-preset patchvolume_8x --network base --steps 50 --device cuda

Networks have random weights (latency does not depend on them); shapes follow the presets with the
latent grid set by ``--size`` and the autoencoder's downsampling. The guidance options are
``generate_ct``'s (default: its default guidance); the guided run renders with a geometry fitted to the
volume. Prints one JSON object: ``seconds_per_volume`` (unguided), ``seconds_per_volume_guided``,
``guidance_seconds_per_volume`` (the difference) and ``guidance_cost_ratio`` (guided / unguided).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from AutoEncoder import PatchVolumeAutoencoder
from benchmarks.common import environment, measure
from dataset import DRRGeometry, HUWindow
from dataset.cli import OneLineParser, number, run_cli
from ddpm import BiFlowNet, Diffusion, LoadedBiFlowNet, parallel_projection_grids
from evaluation.generate_ct import add_guidance_arguments, guidance_settings
from evaluation.generation import SAMPLERS, CTGenerator

CONFIG = Path(__file__).resolve().parents[1] / "config"


def build(size: int, ae_preset: str, network: str, xray_size: int, sampler: str, device: torch.device,
          bf16: bool) -> CTGenerator:
    """A generator with random weights at the requested sizes."""
    ae_cfg = OmegaConf.load(CONFIG / "autoencoder" / f"{ae_preset}.yaml")
    if "defaults" in ae_cfg:  # presets that extend another preset
        base = [d for d in ae_cfg.defaults if d != "_self_"][0]
        ae_cfg = OmegaConf.merge(OmegaConf.load(CONFIG / "autoencoder" / f"{base}.yaml"), ae_cfg)
        del ae_cfg["defaults"]
    ae = PatchVolumeAutoencoder(**OmegaConf.to_container(ae_cfg)).eval().to(device)
    lat = size // ae.downsample_factor
    net_cfg = OmegaConf.to_container(OmegaConf.load(CONFIG / "diffusion" / "network" / f"{network}.yaml"))
    net_cfg.update(in_channels=ae.latent_channels, latent_shape=[lat] * 3, num_classes=0,  # X-ray conditioned only
                   grad_checkpointing=False)  # sampling only: no backward to save memory for
    if net_cfg.get("xray"):
        net_cfg["xray"]["image_size"] = [xray_size, xray_size]
    model = BiFlowNet(**net_cfg).eval().to(device)
    if model.xray_encoder is not None:
        model.set_projection_grids(*(g.to(device) for g in parallel_projection_grids((lat,) * 3)))
    c = ae.latent_channels
    process = Diffusion("rflow", "v", sampler="rflow") if sampler == "rflow" else Diffusion("ddpm", "v")
    loaded = LoadedBiFlowNet(model, process, torch.zeros(1, c, 1, 1, 1, device=device),
                             torch.ones(1, c, 1, 1, 1, device=device),
                             {"num_classes": model.num_classes, "latent_channels": c, "latent_shape": [lat] * 3,
                              "xray_size": [xray_size] * 2 if model.xray_encoder is not None else None})
    return CTGenerator(loaded, ae, HUWindow(), (1.0, 1.0, 1.0), device, bf16)


def main(argv: list[str] | None = None) -> dict:
    p = OneLineParser(prog="python -m benchmarks.bench_generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=number(int, min=1), default=64, help="cubic CT edge (voxels)")
    p.add_argument("--ae-preset", default="tiny", help="config/autoencoder/<preset>.yaml")
    p.add_argument("--network", default="tiny", help="config/diffusion/network/<preset>.yaml")
    p.add_argument("--xray-size", type=number(int, min=1), default=None, help="X-ray edge in pixels (default --size)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=number(int, min=1), default=25, help="denoising steps")
    p.add_argument("--num-samples", type=number(int, min=1), default=1)
    p.add_argument("--guidance-scale", type=number(float, min=0), default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default bf16 on CUDA")
    p.add_argument("--repeats", type=number(int, min=1), default=2)
    p.add_argument("--threads", type=number(int, min=0), default=0, help="CPU threads (0: torch default)")
    add_guidance_arguments(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    xray_size = args.xray_size or args.size
    gen = build(args.size, args.ae_preset, args.network, xray_size, args.sampler, device, bf16)
    ap = torch.rand(1, xray_size, xray_size)
    geometry = DRRGeometry.fit((args.size,) * 3, gen.spacing, xray_size)
    settings = guidance_settings(args)

    def run(guidance) -> dict:
        g = torch.Generator().manual_seed(0)
        return measure(lambda: gen.sample(ap, ap, None, args.num_samples, args.sampler, args.steps,
                                          args.guidance_scale, g, projection_guidance=guidance, geometry=geometry),
                       device, args.repeats)

    result = run(0.0)
    guided = run(settings) if settings.active else result
    per_volume, per_volume_guided = result["time_s"] / args.num_samples, guided["time_s"] / args.num_samples
    record = {"benchmark": "generate", **vars(args), "precision": "bf16" if bf16 else "fp32",
              "latent_shape": gen.biflownet.conditioning["latent_shape"],
              "latent_channels": gen.biflownet.conditioning["latent_channels"],
              "seconds_per_volume": per_volume, "seconds_per_volume_guided": per_volume_guided,
              "guidance_seconds_per_volume": per_volume_guided - per_volume,
              "guidance_cost_ratio": per_volume_guided / per_volume, **result,
              "guided": {k: v for k, v in guided.items()}, **environment(device)}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    sys.exit(run_cli("python -m benchmarks.bench_generate", lambda: main() and None))
