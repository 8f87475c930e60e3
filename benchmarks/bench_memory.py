"""Memory needed to train and run the real presets at 128^3, 256^3 and 512^3 CT: the GPU memory guide's figures.

    python -m benchmarks.bench_memory                      # base BiFlowNet + patchvolume_8x, every size and batch
    python -m benchmarks.bench_memory --sizes 128 --batches 1,2 --ae-preset patchvolume_8x_wide

Every figure is counted, not guessed: the network runs on PyTorch's ``meta`` device (shapes only, no
arithmetic, so 512^3 costs seconds) under a dispatch mode that adds up the bytes of every tensor while it
is alive; the peak is what an allocator must hold at once. Counted per row:

- BiFlowNet training (``biflownet_train``): one step at each CT size (latent = CT / 8), batch and
  activation-checkpointing setting: the live peak of forward + backward (activations and gradients), plus
  the weights, AdamW's two moments and the EMA copy (16 bytes per parameter), all fp32. bf16 autocast saves
  little here (normalisations, the residual stream and the saved inputs of many ops stay fp32, and autocast
  keeps bf16 copies of the weights): ``bf16_peak_ratio`` is the bf16 / fp32 ratio of the step's live peak
  counted with real tensors on this CPU at 24^3 latents.
- Generation (``generate``): one no-grad BiFlowNet evaluation of K samples with classifier-free guidance
  (2K rows), and the autoencoder's decoding of the whole CT with the preset's decoding (whole up to its
  ``decode_window``, slab by slab above it), each with its weights; attention counted as GPUs' fused kernels.
- Autoencoder training (``autoencoder_train``): one step on 64^3 patches (encoder, decoder, L1;
  the discriminator and MedicalNet add their own weights and activations from the GAN start, see
  ``bench_fullsize``), weights plus Adam state (12 bytes per parameter).

Not included: the CUDA context and kernels' workspaces (about 0.5-1 GB per process), allocator
fragmentation (keep 10-20 % free), data loader memory. ``--check`` also counts the 24^3 step on ``meta`` next
to the real CPU count (they agree when the meta count can be trusted).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.bench_autoencoder import preset_config
from benchmarks.common import network_for
from dataset.cli import OneLineParser, number, run_cli
from ddpm.memory import STATE_BYTES_PER_PARAMETER, LiveBytes, count_training_step, parameter_bytes, step_inputs

PROG = "python -m benchmarks.bench_memory"
NETWORKS = Path(__file__).resolve().parents[1] / "config" / "diffusion" / "network"
GB = 1e9


@contextmanager
def fused_attention():
    """Count attention as the fused (flash / memory-efficient) kernels that GPUs run: the output only.

    On ``meta`` PyTorch would take the reference path, which materialises the whole (tokens x tokens) score
    matrix: 2 TB for the autoencoder's bottleneck attention over a 512^3 CT's 64^3 latent. No-grad use only.
    """
    import torch.nn.functional as F

    reference = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda query, key, value, *args, **kwargs: query.new_empty(*query.shape[:-1],
                                                                                              value.shape[-1])
    try:
        yield
    finally:
        F.scaled_dot_product_attention = reference


def biflownet_config(network: str, ct_size: int, checkpointing: bool) -> dict:
    base = OmegaConf.to_container(OmegaConf.load(NETWORKS / f"{network}.yaml"))
    cfg = network_for(base, ct_size // 8)
    cfg["grad_checkpointing"] = checkpointing
    return cfg


def biflownet_sample(cfg: dict, rows: int) -> tuple[int, int]:
    """(peak live bytes, weight bytes) of one no-grad BiFlowNet evaluation of ``rows`` rows on ``meta``."""
    from ddpm import BiFlowNet

    with torch.device("meta"):
        net = BiFlowNet(**{**cfg, "grad_checkpointing": False}).eval()
    counter = LiveBytes()
    with counter, torch.no_grad(), fused_attention():
        net(**step_inputs(cfg, rows, "meta"))
    return counter.peak, parameter_bytes(net)


def autoencoder_decode(preset: str, ct_size: int) -> tuple[int, int]:
    """(peak live bytes, weight bytes) of decoding one ``ct_size``^3 CT's latent with the preset's decoding."""
    from AutoEncoder import PatchVolumeAutoencoder

    cfg = preset_config(preset)
    with torch.device("meta"):
        ae = PatchVolumeAutoencoder(**cfg).eval()
    f = ae.downsample_factor
    z = torch.randn(1, cfg["embedding_dim"], *(ct_size // f,) * 3, device="meta")
    counter = LiveBytes()
    with counter, torch.no_grad(), fused_attention():
        ae.decode(z, quantize=False)
    return counter.peak, parameter_bytes(ae)


def autoencoder_train(preset: str, batch: int) -> tuple[int, int]:
    """(peak live bytes, weight bytes) of one autoencoder training step (encoder, decoder, L1) on ``batch`` patches.

    The codebook lookup is left out (it cannot run on ``meta``); its distance matrix is latent voxels x codes
    (8^3 x 8192 floats = 16 MB per 64^3 patch), small next to the feature maps.
    """
    from AutoEncoder import PatchVolumeAutoencoder

    cfg = preset_config(preset)
    with torch.device("meta"):
        ae = PatchVolumeAutoencoder(**cfg).train()
    x = torch.rand(batch, 1, *(cfg["patch_size"],) * 3, device="meta")
    counter = LiveBytes()
    with counter:
        (ae.decoder(ae.encoder(x)) - x).abs().mean().backward()
    return counter.peak, parameter_bytes(ae)


def measure(network: str, ae_preset: str, sizes: list[int], batches: list[int], samples: int, check: bool) -> dict:
    mid = biflownet_config(network, 192, False)  # 24^3 latents: real tensors, both precisions, on this CPU
    fp32, bf16 = count_training_step(mid, 1, "cpu"), count_training_step(mid, 1, "cpu", bf16=True)
    out: dict = {"benchmark": "memory", "network": network, "autoencoder": ae_preset, "precision": "fp32",
                 "bf16_peak_ratio": round(bf16.peak / fp32.peak, 3),
                 "not_included": "CUDA context and workspaces (~0.5-1 GB per process), allocator fragmentation, "
                                 "data loading", "biflownet_train": [], "generate": [], "autoencoder_train": []}
    if check:
        out["check_24cubed"] = {"cpu_peak_gb": round(fp32.peak / GB, 3), "meta_peak_gb": round(count_training_step(mid, 1).peak / GB, 3)}
    for size in sizes:
        for checkpointing in (True, False):
            cfg = biflownet_config(network, size, checkpointing)
            for batch in batches:
                c = count_training_step(cfg, batch)
                static = STATE_BYTES_PER_PARAMETER * c.params // 4  # AdamW moments and the EMA copy
                row = {"ct": size, "latent": size // 8, "batch": batch, "checkpointing": checkpointing,
                       "params_m": round(c.params / 4 / 1e6, 1), "step_peak_gb": round(c.peak / GB, 2),
                       "total_gb": round((c.params + static + c.peak) / GB, 2)}
                out["biflownet_train"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        cfg = biflownet_config(network, size, False)
        dit_peak, dit_params = biflownet_sample(cfg, 2 * samples)
        dec_peak, ae_params = autoencoder_decode(ae_preset, size)
        row = {"ct": size, "samples": samples, "biflownet_step_gb": round((dit_params + dit_peak) / GB, 2),
               "decode_gb": round((ae_params + dec_peak) / GB, 2)}
        out["generate"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    for batch in batches:
        peak, params = autoencoder_train(ae_preset, batch)
        out["autoencoder_train"].append({"patch": 64, "batch": batch, "total_gb": round((params * 3 + peak) / GB, 2)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="base", help="config/diffusion/network preset (default base)")
    p.add_argument("--ae-preset", default="patchvolume_8x", help="config/autoencoder preset (default patchvolume_8x)")
    p.add_argument("--sizes", default="128,256,512", help="comma-separated CT edges (multiples of 64)")
    p.add_argument("--batches", default="1,2,4,8", help="comma-separated training batches per GPU")
    p.add_argument("--samples", type=number(int, min=1), default=1, help="CTs generated at once (default 1)")
    p.add_argument("--check", action="store_true", help="also count the 24^3 step on meta, next to the CPU count")
    p.add_argument("--threads", type=number(int, min=0), default=0, help="CPU threads (0: torch default)")
    a = p.parse_args(argv)

    def ints(text: str, name: str, multiple: int = 1) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(v < 1 or v % multiple for v in values):
            raise ValueError(f"{name} {text!r}; expected comma-separated positive integers"
                             + (f" that are multiples of {multiple}" if multiple > 1 else ""))
        return values

    def work() -> None:
        sizes, batches = ints(a.sizes, "--sizes", 64), ints(a.batches, "--batches")
        if not (NETWORKS / f"{a.network}.yaml").is_file():
            raise FileNotFoundError(f"{NETWORKS / (a.network + '.yaml')}: no such network preset")
        if a.threads:
            torch.set_num_threads(a.threads)
        print(json.dumps(measure(a.network, a.ae_preset, sizes, batches, a.samples, a.check)))

    return run_cli(PROG, work)


if __name__ == "__main__":
    sys.exit(main())
