"""Step time and peak memory of the patch-volume autoencoder: encode, decode and one training step.

    python -m benchmarks.bench_autoencoder --size 64 --preset tiny
    python -m benchmarks.bench_autoencoder --size 256 --preset patchvolume_8x --device cuda --precision bf16
    python -m benchmarks.bench_autoencoder --compare-official /work/official --threads 2

``--compare-official DIR`` times, interleaved in one process, the official 3D MedDiffusion 8x encoder + decoder
(``n_hiddens`` 48, 24 groups, imported by path from a checkout in ``DIR``, never copied here) against the
encoder + decoder of our 8x presets (``--presets``): one training step on one 64^3 patch (encode, decode,
L1, backward, Adam step; no codebook, no GAN or perceptual loss, the same for all) and the decoding of a
128^3 volume's 16^3 latent without gradients, in fp32 and under bf16 autocast. Medians and ratios.

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

from AutoEncoder import PatchVolumeAutoencoder, PatchVolumeModule
from benchmarks.common import einops_exts_stub, import_official, measure
from ddpm import count_parameters
from dataset.cli import OneLineParser, number, run_cli

CONFIG = Path(__file__).resolve().parents[1] / "config" / "autoencoder"


def preset_config(name: str) -> dict:
    """Keyword arguments of ``config/autoencoder/<name>.yaml`` (a preset that extends another one merged)."""
    path = CONFIG / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such autoencoder preset; expected one of "
                                f"{sorted(q.stem for q in CONFIG.glob('*.yaml'))}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    base = [b for b in cfg.pop("defaults", None) or [] if b != "_self_"]
    if base:
        cfg = {**preset_config(base[0]), **cfg}
    return cfg


def load_official_autoencoder(root: Path) -> tuple[type, type]:
    """The official ``Encoder`` and ``Decoder`` classes from ``root/AutoEncoder/model/PatchVolume.py``.

    That file also defines its Lightning training module; its training-only imports (Lightning, LPIPS, its
    codebook, MedicalNet, helpers) get stand-ins that the two networks never touch.
    """
    import lightning.pytorch as pl
    from torch import nn

    stubs = {"pytorch_lightning": {"LightningModule": pl.LightningModule},
             "pytorch_lightning.callbacks": {"BaseFinetuning": object},
             "einops_exts": einops_exts_stub(),
             "AutoEncoder.utils": {"shift_dim": None, "adopt_weight": None},
             "AutoEncoder.model": {},
             "AutoEncoder.model.lpips": {"LPIPS": nn.Module},
             "AutoEncoder.model.codebook": {"Codebook": nn.Module},
             "AutoEncoder.model.MedicalNetPerceptual": {"MedicalNetPerceptual": nn.Module}}
    module = import_official(Path(root) / "AutoEncoder" / "model" / "PatchVolume.py", stubs)
    return module.Encoder, module.Decoder


def official_comparison(root: Path, presets: list[str], precisions: list[str], repeats: int) -> dict:
    """Training step (64^3 patch) and 128^3 decode of our 8x presets vs the official 8x model, interleaved."""
    import statistics
    import time

    from torch import nn

    encoder_cls, decoder_cls = load_official_autoencoder(root)
    torch.manual_seed(0)
    nets = {"official": nn.ModuleDict({"encoder": encoder_cls(48, [8, 8, 8], 1, "group", 24, 8),
                                       "decoder": decoder_cls(48, [8, 8, 8], 1, "group", 24, 8)})}
    for name in presets:
        cfg = preset_config(name)
        if 2 ** (len(cfg["channels"]) - 1) != 8:
            raise ValueError(f"preset {name!r} is not an 8x autoencoder; the official model compared is 8x")
        ae = PatchVolumeAutoencoder(**cfg)
        nets[name] = nn.ModuleDict({"encoder": ae.encoder, "decoder": ae.decoder})
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-4) for k, n in nets.items()}
    g = torch.Generator().manual_seed(0)
    patch = torch.rand(1, 1, 64, 64, 64, generator=g) * 2 - 1
    latent = torch.randn(1, 8, 16, 16, 16, generator=g)  # a 128^3 volume's latent

    def layout(name: str, x: torch.Tensor) -> torch.Tensor:  # each network in the layout its weights use
        w = next(p for p in nets[name].parameters() if p.dim() == 5)
        return x.contiguous(memory_format=torch.channels_last_3d) if w.is_contiguous(
            memory_format=torch.channels_last_3d) and not w.is_contiguous() else x

    def train_step(name: str, bf16: bool) -> None:
        net, x = nets[name].train(), layout(name, patch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (net["decoder"](net["encoder"](x)).float() - patch).abs().mean()
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    def decode(name: str, bf16: bool) -> None:
        net, z = nets[name].eval(), layout(name, latent)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net["decoder"](z)

    rows = []
    for precision in precisions:
        bf16 = precision == "bf16"
        for phase, fn in (("train_step", train_step), ("decode_128", decode)):
            times: dict[str, list[float]] = {k: [] for k in nets}
            for k in nets:
                fn(k, bf16)  # warm-up
            for _ in range(repeats):
                for k in nets:
                    t0 = time.perf_counter()
                    fn(k, bf16)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"phase": phase, "precision": precision, **{f"{k}_s": round(v, 3) for k, v in med.items()},
                   **{f"ratio_{k}": round(med[k] / med["official"], 3) for k in presets}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress: these runs take minutes
    return {"benchmark": "autoencoder_vs_official", "official": str(root), "threads": torch.get_num_threads(),
            "repetitions": repeats, "what": "encoder + decoder only (no codebook, GAN or perceptual loss), Adam",
            "params_m": {k: round(sum(p.numel() for p in n.parameters()) / 1e6, 2) for k, n in nets.items()},
            "results": rows}


def main(argv: list[str] | None = None) -> dict:
    p = OneLineParser(prog="python -m benchmarks.bench_autoencoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=number(int, min=1), default=64, help="cubic volume edge (voxels)")
    p.add_argument("--preset", default="tiny", help="config/autoencoder/<preset>.yaml")
    p.add_argument("--batch", type=number(int, min=1), default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=number(int, min=1), default=3)
    p.add_argument("--threads", type=number(int, min=0), default=0, help="CPU threads (0: torch default)")
    p.add_argument("--compare-official", type=Path, default=None, metavar="DIR",
                   help="checkout of the official 3D MedDiffusion: time its 8x autoencoder against --presets")
    p.add_argument("--presets", default="patchvolume_8x,patchvolume_8x_wide",
                   help="comma-separated 8x presets for --compare-official")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (--compare-official)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_official is not None:
        precisions = [x for x in args.precisions.split(",") if x]
        if not precisions or set(precisions) - {"fp32", "bf16"}:
            raise ValueError(f"--precisions {args.precisions!r}; expected a comma-separated subset of fp32,bf16")
        presets = [x for x in args.presets.split(",") if x]
        if not presets:
            raise ValueError("--presets is empty; expected comma-separated autoencoder presets")
        result = official_comparison(args.compare_official, presets, precisions, args.repeats)
        print(json.dumps(result))
        return result
    device = torch.device(args.device)
    cfg = preset_config(args.preset)
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
