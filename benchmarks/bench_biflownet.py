"""BiFlowNet benchmark: training-step time, peak memory, achieved TFLOP/s (GPU), parameter counts.

    python -m benchmarks.bench_biflownet                         # tiny preset, CPU or GPU, prints JSON
    python -m benchmarks.bench_biflownet --preset base --latent-size 32 --batch 2
    python -m benchmarks.bench_biflownet --study conditioning --data outputs/demo/data --steps 300
    python -m benchmarks.bench_biflownet --study geometry --preset base --latent-size 16 --batch 2 --steps 5
    python -m benchmarks.bench_biflownet --compare-official /work/official --latent-size 16 --steps 3 --threads 2
    python -m benchmarks.bench_biflownet --profile 15 --preset base --latent-size 16 --batch 1 --threads 2

``--study conditioning`` trains the tiny preset with each X-ray conditioning mode (plain cross-attention,
footprint-restricted cross-attention, back-projection, footprint + back-projection) for the same number
of steps on a prepared dataset with latents, and reports the validation denoising loss (fixed timesteps,
fixed noise) of each.

``--study geometry`` times training steps of one preset side by side in one process (interleaved, median of
``--steps`` repetitions each): the default geometry (fixed grid buffers), a distinct per-sample geometry for
every sample of the batch (projection cached after its first use), and new distinct geometries every step
(grids and footprints computed each step); ratios are against the fixed path.

``--compare-official DIR`` times training steps (forward, loss, backward, optimiser step; batch 1) of the
X-ray-conditioned ``base`` preset against the official 3D MedDiffusion BiFlowNet at the same width and
depth, imported from a checkout of that project in ``DIR`` (read-only, never copied here), interleaved in
one process with the same thread count, in fp32 and under bf16 autocast (``--precisions``: by default
bf16 only where it is native); each network with its own
training optimiser (ours: ``config/optimizer/adamw.yaml``; official: ``torch.optim.AdamW``, or the same
fused AdamW as ours with ``--official-optimizer fused``). Ours runs as shipped (``grad_checkpointing: auto``,
decided for batch 1 on this machine) and with the other setting. Medians and ratios (ours / official).

``--profile N`` profiles one training step of ``--preset`` (after a warm-up step; fp32 and, with
``--precisions``, bf16 autocast) with ``torch.profiler`` and reports the step's wall time, the ``N`` operators
with the most self time, and how much of the step went into copying data between layouts (``aten::copy_``,
``clone``, ``contiguous``, reorders: time spent moving bytes, not computing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.common import einops_exts_stub, import_official
from dataset.cli import OneLineParser, number, run_cli
from ddpm import BiFlowNet, BiFlowNetModule, Diffusion, count_parameters

CONFIG = Path(__file__).resolve().parents[1] / "config" / "diffusion"
PRESETS = ("tiny", "small", "base", "large")


def preset(name: str, latent_size: int | None = None, batch: int | None = None, device: str = "cpu") -> dict:
    """Network kwargs of a size preset (optionally at another cubic latent size).

    ``grad_checkpointing: auto`` is decided as training decides it for ``batch`` samples per step on ``device``
    (:func:`ddpm.memory.grad_checkpointing_for`); without ``batch`` (no training) recompute is off.
    """
    from ddpm.memory import grad_checkpointing_for

    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG / "network" / f"{name}.yaml"))
    if latent_size:
        cfg["latent_shape"] = [latent_size] * 3
    if batch is None:
        cfg["grad_checkpointing"] = cfg.get("grad_checkpointing") is True
    else:
        cfg["grad_checkpointing"] = grad_checkpointing_for(cfg, batch, "cpu" if device == "cpu" else "auto")[0]
    return cfg


def parameter_counts() -> dict:
    """Trainable parameters per preset (whole network and its X-ray encoder)."""
    out = {}
    for name in PRESETS:
        net = BiFlowNet(**preset(name))
        out[name] = {"total": count_parameters(net), "xray_encoder": count_parameters(net.xray_encoder)}
    return out


def training_optimizer(params) -> torch.optim.Optimizer:
    """The BiFlowNet training optimiser of ``config/optimizer/adamw.yaml``."""
    import hydra.utils

    return hydra.utils.instantiate(OmegaConf.load(CONFIG.parent / "optimizer" / "adamw.yaml"))(params)


def step_benchmark(name: str, latent_size: int | None, batch: int, steps: int, device: str) -> dict:
    """Time full training steps (forward, loss, backward, optimiser step) of one preset."""
    cfg = preset(name, latent_size, batch, device)
    dev = torch.device(device)
    net = BiFlowNet(**cfg).to(dev)
    diff = Diffusion("ddpm", "v")
    opt = training_optimizer(net.parameters())
    c, shape = cfg["in_channels"], cfg["latent_shape"]
    z = torch.randn(batch, c, *shape, device=dev)
    xr = cfg.get("xray")
    cond = {"y": torch.zeros(batch, dtype=torch.long, device=dev)} if cfg.get("num_classes") else {}
    if xr:
        cond["ap"] = torch.rand(batch, 1, *xr["image_size"], device=dev)
        cond["lat"] = torch.rand(batch, 1, *xr["image_size"], device=dev)
    use_bf16 = dev.type == "cuda"

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = diff.training_loss(lambda x, t: net(x, t, **cond), z)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = None
    if dev.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    out = {
        "preset": name,
        "latent_shape": list(shape),
        "batch": batch,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": "bf16-mixed" if use_bf16 else "fp32",
        "step_time_s": round(dt, 4),
        "grad_checkpointing": cfg["grad_checkpointing"],
        "params": count_parameters(net),
    }
    if dev.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 3)
        out["tflops_per_step"] = round(flops / 1e12, 3)
        out["achieved_tflops"] = round(flops / dt / 1e12, 2)
    else:
        out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
        out["threads"] = torch.get_num_threads()
    return out


def _step_inputs(cfg: dict, batch: int, dev: torch.device, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg["in_channels"], *cfg["latent_shape"], generator=g).to(dev)
    cond = {"y": torch.zeros(batch, dtype=torch.long, device=dev)} if cfg.get("num_classes") else {}
    xr = cfg.get("xray")
    if xr:
        cond["ap"] = torch.rand(batch, 1, *xr["image_size"], generator=g).to(dev)
        cond["lat"] = torch.rand(batch, 1, *xr["image_size"], generator=g).to(dev)
    return z, cond


def geometry_study(name: str, latent_size: int | None, batch: int, steps: int, device: str) -> dict:
    """Training-step time with the fixed geometry buffers vs per-sample geometries (cached and fresh)."""
    from dataset.drr import DRRGeometry

    cfg = preset(name, latent_size, batch, device)
    if not cfg.get("xray"):
        raise ValueError(f"preset {name} has no X-ray conditioning; --study geometry needs one")
    dev = torch.device(device)
    net = BiFlowNet(**cfg).to(dev)
    shape = tuple(cfg["latent_shape"])
    factor = 8  # the 8x autoencoder: a 16^3 latent is a 128^3 CT
    ct_spacing = 2.0
    default = DRRGeometry.fit(tuple(s * factor for s in shape), (ct_spacing,) * 3, tuple(cfg["xray"]["image_size"]))
    net.set_geometry(default, (ct_spacing * factor,) * 3)
    diff = Diffusion("ddpm", "v")
    opt = training_optimizer(net.parameters())
    z, cond = _step_inputs(cfg, batch, dev)
    draw = iter(range(10**9))

    def distinct(k: int) -> torch.Tensor:  # k geometries that differ in every view parameter that may vary
        out = []
        for _ in range(k):
            i = next(draw)
            g = default.replace_view("AP", sdd=default.ap.sdd + 1 + i % 300, offset=(0.01 * i, -0.02 * i))
            out.append(g.replace_view("LAT", angle=((i * 0.37) % 6) - 3, sid=default.lat.sid - 1 - i % 50).to_tensor())
        return torch.stack(out).float().to(dev)

    cached = distinct(batch)
    use_bf16 = dev.type == "cuda"
    modes = {"fixed": lambda: None, "per_sample_cached": lambda: cached, "per_sample_fresh": lambda: distinct(batch)}

    def step(geometry: torch.Tensor | None) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = diff.training_loss(lambda x, t: net(x, t, geometry=geometry, **cond), z)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for make in modes.values():  # warm-up (and the first projection of the cached geometries)
        step(make())
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(steps):
        for mode, make in modes.items():
            times[mode].append(step(make()))
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "study": "geometry", "preset": name, "latent_shape": list(shape), "batch": batch, "repetitions": steps,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": "bf16-mixed" if use_bf16 else "fp32", "threads": torch.get_num_threads(),
        "step_time_s": {m: round(v, 4) for m, v in med.items()},
        "ratio_to_fixed": {m: round(v / med["fixed"], 4) for m, v in med.items() if m != "fixed"},
        "cache_entries": len(net.xray._cache),
    }


def cpu_training_step(net: BiFlowNet, opt: torch.optim.Optimizer, diff: Diffusion, z: torch.Tensor, cond: dict):
    """``step(bf16)``: one CPU training step of ``net`` on ``z`` (loss, backward, optimiser), optionally under bf16
    autocast."""
    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diff.training_loss(lambda x, t: net(x, t, **cond), z)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _load_official(root: Path):
    """The official BiFlowNet class from ``root/ddpm/BiFlowNet.py`` (imported by path, never copied)."""
    stubs = {}
    try:
        import einops_exts  # noqa: F401
    except ImportError:  # an import-only dependency of that file; its one helper used here is a named rearrange
        stubs["einops_exts"] = einops_exts_stub()
    return import_official(Path(root) / "ddpm" / "BiFlowNet.py", stubs).BiFlowNet


def official_comparison(root: Path, latent_sizes: list[int], precisions: list[str], steps: int,
                        official_optimizer: str = "default") -> dict:
    """Training-step time of the base preset vs the official BiFlowNet (same width/depth), interleaved.

    Ours runs twice: as the preset ships (``grad_checkpointing: auto``, decided for batch 1 on this machine as
    training decides it) and with the other setting (recompute on or off; the official network has none).
    """
    import torch.nn.functional as F

    official_cls = _load_official(root)
    rows, shipped = [], {}
    for size in latent_sizes:
        cfg = preset("base", size, batch=1)
        other = "ours_no_recompute" if cfg["grad_checkpointing"] else "ours_recompute"
        shipped[size] = cfg["grad_checkpointing"]
        torch.manual_seed(0)
        nets = {"ours": BiFlowNet(**cfg), other: BiFlowNet(**{**cfg, "grad_checkpointing": not cfg["grad_checkpointing"]})}
        nets[other].load_state_dict(nets["ours"].state_dict())
        with contextlib.redirect_stdout(sys.stderr):  # the official constructor prints its grid size; stdout is the JSON
            official = official_cls(dim=cfg["model_channels"], dim_mults=tuple(cfg["channel_mults"]), channels=cfg["in_channels"],
                                    cond_classes=cfg["num_classes"] or None, use_sparse_linear_attn=[int(i in cfg["attn_levels"])
                                                                                            for i in range(len(cfg["channel_mults"]))],
                                    sub_volume_size=(cfg["sub_volume"],) * 3, patch_size=cfg["token_patch"],
                                    DiT_num_heads=cfg["dit_heads"], resnet_groups=cfg["norm_groups"], vq_size=64,
                                    num_mid_DiT=cfg["num_mid_dit"])
        opts = {k: training_optimizer(n.parameters()) for k, n in nets.items()}
        opt_official = (torch.optim.AdamW(official.parameters(), lr=1e-4) if official_optimizer == "default"
                        else training_optimizer(official.parameters()))
        diff = Diffusion("ddpm", "v")
        z, cond = _step_inputs(cfg, 1, torch.device("cpu"))
        res = torch.tensor([size * 8 / 64.0] * 3)  # the official resolution condition (CT edge / 64)

        def step_official(bf16: bool) -> None:
            noise, t = torch.randn_like(z), torch.randint(0, 1000, (1,))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.mse_loss(official(z + noise, t, y=cond.get("y"), res=res).float(), noise)
            loss.backward()
            opt_official.step()
            opt_official.zero_grad(set_to_none=True)

        runners = {"official": step_official, **{k: cpu_training_step(n, opts[k], diff, z, cond) for k, n in nets.items()}}
        for precision in precisions:
            bf16 = precision == "bf16"
            times: dict[str, list[float]] = {k: [] for k in runners}
            for fn in runners.values():
                fn(bf16)  # warm-up
            for _ in range(steps):
                for name, fn in runners.items():
                    t0 = time.perf_counter()
                    fn(bf16)
                    times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"latent_size": size, "precision": precision, "official_s": round(med["official"], 3)}
            for k in nets:
                row[f"{k}_s"] = round(med[k], 3)
                row["ratio" if k == "ours" else f"ratio_{k.removeprefix('ours_')}"] = round(med[k] / med["official"], 3)
            row.update({f"{k}_all_s": [round(v, 3) for v in times[k]] for k in runners})
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress: these runs take minutes
        params = {"official": sum(p.numel() for p in official.parameters()), "ours": count_parameters(nets["ours"])}
        del nets, official, opts, opt_official
    return {"benchmark": "biflownet_vs_official", "official": str(root), "preset": "base", "batch": 1,
            "threads": torch.get_num_threads(), "repetitions": steps, "cpu_native_bf16": _native_bf16(),
            "optimizers": {"ours": "config/optimizer/adamw.yaml",
                           "official": "torch.optim.AdamW" + (" as ours" if official_optimizer == "fused" else "")},
            "ours": "base preset as shipped (grad_checkpointing: auto, decided for batch 1 on this machine)",
            "ours_grad_checkpointing": {str(k): v for k, v in shipped.items()},
            "ours_recompute / ours_no_recompute": "the same weights with the other grad_checkpointing setting",
            "params": params, "results": rows}


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::to_mkldnn", "aten::to_dense",
            "aten::_to_copy", "aten::flip", "aten::im2col", "aten::col2im")


def profile_step(name: str, latent_size: int | None, batch: int, precisions: list[str], top: int) -> dict:
    """Self time per operator of one training step (the step's wall time and its top ``top`` operators)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = preset(name, latent_size, batch)
    torch.manual_seed(0)
    net = BiFlowNet(**cfg)
    z, cond = _step_inputs(cfg, batch, torch.device("cpu"))
    step = cpu_training_step(net, training_optimizer(net.parameters()), Diffusion("ddpm", "v"), z, cond)
    rows = []
    for precision in precisions:
        bf16 = precision == "bf16"
        step(bf16)  # warm-up: kernels chosen, caches filled
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step(bf16)
            wall = time.perf_counter() - t0
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        copies = sum(e.self_cpu_time_total for e in events if e.key in COPY_OPS) / 1e6
        rows.append({"precision": precision, "step_s": round(wall, 3), "profiled_self_s": round(total, 3),
                     "copy_s": round(copies, 3), "copy_share": round(copies / total, 3) if total else None,
                     "top": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count}
                             for e in events[:top]]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"benchmark": "biflownet_profile", "preset": name, "latent_shape": cfg["latent_shape"], "batch": batch,
            "grad_checkpointing": cfg["grad_checkpointing"],
            "threads": torch.get_num_threads(), "cpu_native_bf16": _native_bf16(), "copy_ops": list(COPY_OPS),
            "results": rows}


def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


MODES = {
    "cross_attention": {"cross_attention": "full", "back_projection": False},
    "footprint": {"cross_attention": "footprint", "back_projection": False},
    "back_projection": {"cross_attention": "none", "back_projection": True},
    "footprint+back_projection": {"cross_attention": "footprint", "back_projection": True},
    "pooled_only": {"cross_attention": "none", "back_projection": False},
}


def conditioning_study(data: Path, steps: int, batch: int, seed: int) -> dict:
    """Train the tiny preset per conditioning mode for `steps` steps; report the validation denoising loss."""
    from dataset import PairedDataModule
    from ddpm.preflight import read_latent_stats

    dm = PairedDataModule(data / "manifest.csv", batch_size=batch, load=("ap", "lat", "latent"))
    dm.setup("fit")
    train = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    held = [dm.datasets[s][i] for s in ("val", "test") for i in range(len(dm.datasets[s]))]
    stack = lambda items, k: torch.stack([it[k] for it in items])  # noqa: E731
    stats = read_latent_stats(data / "latent_stats.json")
    xray_hw = list(train[0]["ap"].shape[1:])
    shape = list(train[0]["latent"].shape)
    results = {}
    for mode, kw in MODES.items():
        torch.manual_seed(seed)
        net_cfg = {**preset("tiny"), **kw, "in_channels": shape[0], "latent_shape": shape[1:]}
        net_cfg["xray"] = {**net_cfg["xray"], "image_size": xray_hw}
        module = BiFlowNetModule(net_cfg, {"process": "ddpm", "target": "v"}, latent_stats=stats.to_dict(), p_uncond=0.1)
        net, diff = module.model, module.diffusion
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(train), (batch,), generator=g).tolist()
            items = [train[i] for i in idx]
            z = module.normalize(stack(items, "latent"))
            ap, lat = stack(items, "ap"), stack(items, "lat")
            drop = torch.rand(batch, generator=g) < 0.1
            loss = diff.training_loss(lambda x, t: net(x, t, ap=ap, lat=lat, drop=drop, y=torch.zeros(batch, dtype=torch.long)), z, generator=g)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        train_time = time.perf_counter() - t0
        net.eval()
        z = module.normalize(stack(held, "latent"))
        ap, lat = stack(held, "ap"), stack(held, "lat")
        y = torch.zeros(len(held), dtype=torch.long)
        with torch.no_grad():
            vals, vals_shuffled = [], []
            perm = torch.roll(torch.arange(len(held)), 1)  # X-rays of another subject: does the net use them?
            for t in (50, 200, 400, 600, 800):
                tt = torch.full((len(held),), t)
                ge = torch.Generator().manual_seed(1000 + t)
                vals.append(diff.training_loss(lambda x, s: net(x, s, y=y, ap=ap, lat=lat), z, t=tt, generator=ge).item())
                ge = torch.Generator().manual_seed(1000 + t)
                vals_shuffled.append(
                    diff.training_loss(lambda x, s: net(x, s, y=y, ap=ap[perm], lat=lat[perm]), z, t=tt, generator=ge).item()
                )
        results[mode] = {
            "val_loss": round(sum(vals) / len(vals), 4),
            "val_loss_wrong_xrays": round(sum(vals_shuffled) / len(vals_shuffled), 4),
            "val_loss_per_t": [round(v, 4) for v in vals],
            "train_time_s": round(train_time, 1),
            "params": count_parameters(net),
        }
    return {"study": "conditioning", "data": str(data), "steps": steps, "batch": batch, "seed": seed,
            "train_subjects": len(train), "heldout_subjects": len(held), "results": results}


def precision_list(text: str, device: str = "cpu") -> list[str]:
    """``--precisions``: a comma-separated subset of fp32, bf16, or ``auto``.

    ``auto`` is both on a GPU and on a CPU that computes bf16 natively (AVX512-BF16 / AMX), and fp32 alone on
    other CPUs: there oneDNN emulates bf16, and the official network's bf16 step took 121 s instead of 3 s (an
    AVX2 machine, ``benchmarks/RESULTS.md``) for a figure that says nothing about a GPU.
    """
    if text == "auto":
        return ["fp32", "bf16"] if device != "cpu" or _native_bf16() else ["fp32"]
    precisions = [x for x in text.split(",") if x]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise ValueError(f"--precisions {text!r}; expected auto or a comma-separated subset of fp32,bf16")
    return precisions


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.bench_biflownet", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--latent-size", type=number(int, min=1), default=None, help="cubic latent edge (default: the preset's)")
    p.add_argument("--batch", type=number(int, min=1), default=2)
    p.add_argument("--steps", type=number(int, min=1), default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=number(int, min=0), default=None, help="CPU threads (default: torch's)")
    p.add_argument("--study", choices=["conditioning", "geometry"], default=None)
    p.add_argument("--data", type=Path, default=None, help="prepared dataset folder with latents (--study)")
    p.add_argument("--seed", type=number(int, min=0), default=0)
    p.add_argument("--compare-official", type=Path, default=None, metavar="DIR",
                   help="checkout of the official 3D MedDiffusion: time its BiFlowNet against the base preset")
    p.add_argument("--official-optimizer", choices=["default", "fused"], default="default",
                   help="official network's AdamW: torch's default implementation, or the same fused one as ours")
    p.add_argument("--precisions", default="auto",
                   help="comma-separated: fp32, bf16 (--compare-official, --profile); auto (default): both where "
                        "bf16 is native (GPU, CPUs with AVX512-BF16/AMX), fp32 alone where a CPU emulates it")
    p.add_argument("--profile", type=number(int, min=1), default=None, metavar="N",
                   help="profile one training step of --preset; report its N most expensive operators")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    def work() -> None:
        if a.study == "conditioning":
            if a.data is None:
                raise ValueError("--study conditioning needs --data (a prepared dataset folder with latents)")
            out = conditioning_study(a.data, a.steps, a.batch, a.seed)
        elif a.profile is not None and a.compare_official is not None:
            raise ValueError("--profile and --compare-official are separate runs; give one of them")
        elif a.profile is not None:
            out = profile_step(a.preset, a.latent_size, a.batch, precision_list(a.precisions, a.device), a.profile)
        elif a.compare_official is not None:
            sizes = [a.latent_size] if a.latent_size else [16, 32]
            out = official_comparison(a.compare_official, sizes, precision_list(a.precisions, a.device), a.steps,
                                      a.official_optimizer)
        elif a.study == "geometry":
            out = geometry_study(a.preset, a.latent_size, a.batch, a.steps, a.device)
        else:
            out = {"benchmark": "biflownet_train_step", **step_benchmark(a.preset, a.latent_size, a.batch, a.steps, a.device),
                   "parameter_counts": parameter_counts()}
        print(json.dumps(out))

    return run_cli(p.prog, work)


if __name__ == "__main__":
    sys.exit(main())
