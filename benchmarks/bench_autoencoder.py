"""Step time and peak memory of the patch-volume autoencoder: encode, decode and one training step.

    python -m benchmarks.bench_autoencoder --size 64 --preset tiny
    python -m benchmarks.bench_autoencoder --size 256 --preset patchvolume_8x --device cuda --precision bf16

Prints one JSON object. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak
RSS (``resource.getrusage``) after each phase (phases run in order encode, decode, train, so each figure is
the peak so far); tracemalloc is not used because tensors live outside the Python heap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from AutoEncoder import PatchVolumeModule
from benchmarks.common import measure
from ddpm import count_parameters
from dataset.cli import OneLineParser, number, run_cli

CONFIG = Path(__file__).resolve().parents[1] / "config" / "autoencoder"


def main(argv: list[str] | None = None) -> dict:
    p = OneLineParser(prog="python -m benchmarks.bench_autoencoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=number(int, min=1), default=64, help="cubic volume edge (voxels)")
    p.add_argument("--preset", default="tiny", help="config/autoencoder/<preset>.yaml")
    p.add_argument("--batch", type=number(int, min=1), default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=number(int, min=1), default=3)
    p.add_argument("--threads", type=number(int, min=0), default=0, help="CPU threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG / f"{args.preset}.yaml"), resolve=True)
    base = cfg.pop("defaults", None)
    if base:  # a preset that extends another one
        parent = OmegaConf.to_container(OmegaConf.load(CONFIG / f"{base[0]}.yaml"), resolve=True)
        cfg = {**parent, **cfg}
    torch.manual_seed(0)
    module = PatchVolumeModule(cfg, loss={"perceptual_weight": 0.0, "gan_weight": 0.0}).to(device)
    ae = module.autoencoder
    x = (torch.rand(args.batch, 1, args.size, args.size, args.size, device=device) * 2 - 1)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def encode() -> None:
        with torch.no_grad(), autocast:
            ae.encode(x)

    with torch.no_grad(), autocast:
        z = ae.encode(x)

    def decode() -> None:
        with torch.no_grad(), autocast:
            ae.decode(z)

    def train_step() -> None:
        ae.train()
        with autocast:
            out = ae(x)
            loss = (out.reconstruction.float() - x).abs().mean() + out.commitment_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ae.eval()
    result = {
        "benchmark": "autoencoder", "preset": args.preset, "size": args.size, "batch": args.batch,
        "device": str(device), "precision": args.precision, "threads": torch.get_num_threads(),
        "params_m": count_parameters(ae) / 1e6,
        "latent_shape": list(z.shape[1:]),
        "encode": measure(encode, device, args.repeats),
        "decode": measure(decode, device, args.repeats),
        "train_step": measure(train_step, device, args.repeats),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(run_cli("python -m benchmarks.bench_autoencoder", lambda: main() and None))
