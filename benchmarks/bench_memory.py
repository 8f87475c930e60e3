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
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.bench_autoencoder import preset_config
from benchmarks.common import network_for
from dataset.cli import OneLineParser, number, run_cli

PROG = "python -m benchmarks.bench_memory"
NETWORKS = Path(__file__).resolve().parents[1] / "config" / "diffusion" / "network"
GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created inside it while the storage is alive.

    ``peak`` is the largest total at any moment; ``peak_activations`` the largest total without the parameter
    gradients accumulated so far (counted through ``grad_bytes``, which a post-accumulate hook keeps). On
    ``meta``, ``nonzero`` (the footprint attention's voxel lists) has no data to count: every element counts.
    """

    def __init__(self) -> None:
        super().__init__()
        import torch.fx.experimental._config as fx_config

        self._nonzero = fx_config.patch(meta_nonzero_assume_all_nonzero=True)
        self.live = 0
        self.peak = 0
        self.grad_bytes = 0
        self.peak_activations = 0
        self._alive: set[int] = set()

    def __enter__(self):
        self._nonzero.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._nonzero.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage) if t.device.type == "meta" else storage.data_ptr()
                if key in self._alive:
                    continue
                self._alive.add(key)
                n = storage.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                self.peak_activations = max(self.peak_activations, self.live - self.grad_bytes)
                weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._alive.discard(key)

    @contextmanager
    def counting_gradients(self, module: torch.nn.Module):
        """Keep ``grad_bytes`` up to date while ``module``'s parameter gradients accumulate."""
        def hook(p: torch.Tensor) -> None:
            self.grad_bytes += p.grad.nbytes if p.grad is not None else 0

        handles = [p.register_post_accumulate_grad_hook(hook) for p in module.parameters() if p.requires_grad]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@contextmanager
def fused_attention():
    """Count attention as the fused (flash / memory-efficient) kernels that GPUs run: the output only.

    On ``meta`` PyTorch would take the reference path, which materialises the whole (tokens x tokens) score
    matrix: 2 TB for the autoencoder's bottleneck attention over a 512^3 CT's 64^3 latent. No-grad use only.
    """
    import torch.nn.functional as F

    reference = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: q.new_empty(*q.shape[:-1], v.shape[-1])
    try:
        yield
    finally:
        F.scaled_dot_product_attention = reference


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def biflownet_config(network: str, ct_size: int, checkpointing: bool) -> dict:
    base = OmegaConf.to_container(OmegaConf.load(NETWORKS / f"{network}.yaml"))
    cfg = network_for(base, ct_size // 8)
    cfg["grad_checkpointing"] = checkpointing
    return cfg


def biflownet_inputs(cfg: dict, batch: int, device: str) -> dict:
    z = torch.randn(batch, cfg["in_channels"], *cfg["latent_shape"], device=device)
    out = {"x": z, "t": torch.randint(0, 1000, (batch,), device=device)}
    if cfg.get("xray"):
        for view in ("ap", "lat"):
            out[view] = torch.rand(batch, 1, *cfg["xray"]["image_size"], device=device)
    if cfg.get("num_classes"):
        out["y"] = torch.zeros(batch, dtype=torch.long, device=device)
    return out


def biflownet_step(cfg: dict, batch: int, device: str = "meta", bf16: bool = False) -> LiveBytes:
    """Live bytes of one BiFlowNet training step (forward, loss, backward) on ``device``."""
    from ddpm import BiFlowNet, biflownet

    with torch.device(device):
        net = BiFlowNet(**cfg)
    inputs = biflownet_inputs(cfg, batch, device)
    counter = LiveBytes()
    native = biflownet._native_cpu_bf16
    biflownet._native_cpu_bf16 = lambda: True  # count bf16 even where this CPU would fall back to fp32
    try:
        with counter, counter.counting_gradients(net):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(**inputs)
            (out.float() - inputs["x"]).square().mean().backward()
    finally:
        biflownet._native_cpu_bf16 = native
    counter.params = parameter_bytes(net)
    return counter


def biflownet_sample(cfg: dict, rows: int) -> tuple[int, int]:
    """(peak live bytes, weight bytes) of one no-grad BiFlowNet evaluation of ``rows`` rows on ``meta``."""
    from ddpm import BiFlowNet

    with torch.device("meta"):
        net = BiFlowNet(**{**cfg, "grad_checkpointing": False}).eval()
    counter = LiveBytes()
    with counter, torch.no_grad(), fused_attention():
        net(**biflownet_inputs(cfg, rows, "meta"))
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
    fp32, bf16 = biflownet_step(mid, 1, "cpu"), biflownet_step(mid, 1, "cpu", bf16=True)
    out: dict = {"benchmark": "memory", "network": network, "autoencoder": ae_preset, "precision": "fp32",
                 "bf16_peak_ratio": round(bf16.peak / fp32.peak, 3),
                 "not_included": "CUDA context and workspaces (~0.5-1 GB per process), allocator fragmentation, "
                                 "data loading", "biflownet_train": [], "generate": [], "autoencoder_train": []}
    if check:
        out["check_24cubed"] = {"cpu_peak_gb": round(fp32.peak / GB, 3), "meta_peak_gb": round(biflownet_step(mid, 1).peak / GB, 3)}
    for size in sizes:
        for checkpointing in (True, False):
            cfg = biflownet_config(network, size, checkpointing)
            for batch in batches:
                c = biflownet_step(cfg, batch)
                static = 4 * c.params  # AdamW's two fp32 moments and the fp32 EMA copy, next to the weights
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
