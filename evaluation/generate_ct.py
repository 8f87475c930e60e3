"""``python -m evaluation.generate_ct``: a CT volume (NIfTI, HU) from an AP + lateral X-ray pair.

Single pair::

    python -m evaluation.generate_ct --checkpoint biflownet.ckpt --ap AP.pt --lat LAT.pt --output ct.nii.gz

Batch over a manifest split (one ``<subject_id>.nii.gz`` per subject)::

    python -m evaluation.generate_ct --checkpoint biflownet.ckpt --manifest data/manifest.csv --split test \
        --output-dir generated/

X-rays may be ``.pt`` tensors, PNG or 2-D NIfTI, normalised to [0, 1] in the training orientation
(see CLAUDE.md). With ``--num-samples K > 1`` the output is the mean of K samples, written beside
``<name>_std.nii.gz`` (per-voxel standard deviation in HU: the model's uncertainty) and each sample
``<name>_sample<k>.nii.gz``. Existing outputs are refused unless ``--overwrite``; every file is written
atomically and all output paths are checked before any sampling starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from dataset import Manifest, load_xray, write_nifti
from dataset.cli import number
from dataset.drr import RENDERERS
from evaluation.generation import SAMPLERS, CTGenerator
from evaluation.projection_guidance import DEFAULT_GUIDANCE, GuidanceSettings


def output_paths(output: Path, num_samples: int) -> dict[str, Path]:
    """Every file a generation of ``num_samples`` writes for ``output`` (keys: mean, std, sample<k>)."""
    name = output.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else output.stem
    paths = {"mean": output}
    if num_samples > 1:
        paths["std"] = output.with_name(f"{stem}_std.nii.gz")
        paths.update({f"sample{k}": output.with_name(f"{stem}_sample{k}.nii.gz") for k in range(num_samples)})
    return paths


def check_outputs(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse existing outputs (unless ``overwrite``) and names that are not NIfTI, before any work."""
    for p in paths:
        if not p.name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"{p}: output must be a .nii or .nii.gz file")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p}: already exists; pass --overwrite to replace it")


def write_generation(gen: CTGenerator, volumes: torch.Tensor, output: Path) -> dict[str, Path]:
    """Write the mean (and, for K > 1, std and samples) of ``(K, 1, D, H, W)`` volumes in [-1, 1] as HU NIfTI."""
    paths = output_paths(output, volumes.shape[0])
    output.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(gen.to_hu_image(volumes.mean(dim=0)), paths["mean"])
    if volumes.shape[0] > 1:
        write_nifti(gen.std_hu_image(volumes), paths["std"])
        for k in range(volumes.shape[0]):
            write_nifti(gen.to_hu_image(volumes[k]), paths[f"sample{k}"])
    return paths


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpoint, sampler and device options shared by the generation CLIs (read by :func:`load_generator`)."""
    p.add_argument("--checkpoint", "--model-ckpt", type=Path, required=True, help="BiFlowNet checkpoint (.ckpt)")
    p.add_argument("--autoencoder", "--AE-ckpt", type=Path, default=None,
                   help="autoencoder checkpoint (default: the one recorded in --checkpoint)")
    p.add_argument("--adapter", type=Path, default=None,
                   help="LoRA adapter folder trained on --checkpoint (merged before sampling)")
    p.add_argument("--num-inference-steps", "--num_inference_steps", type=int, default=50)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--guidance-scale", "--guidance_scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--fp32", action="store_true", help="disable bf16 autocast on CUDA")


def load_generator(args: argparse.Namespace) -> CTGenerator:
    """The :class:`CTGenerator` that :func:`add_model_arguments`' options describe."""
    return CTGenerator.from_checkpoints(args.checkpoint, args.autoencoder, args.device,
                                        bf16=False if args.fp32 else None, adapter=args.adapter)


def add_guidance_arguments(p: argparse.ArgumentParser) -> None:
    """Projection-consistency guidance options (read by :func:`guidance_settings`)."""
    d = DEFAULT_GUIDANCE
    p.add_argument("--projection-guidance", type=number(float, 0.0, 1.0), default=d.weight, metavar="W",
                   help=f"weight in [0, 1] of the guidance towards the input X-rays: the fraction of the DRR "
                        f"mismatch each guided step removes (0 = off; default {d.weight:g})")
    p.add_argument("--guidance-steps", type=number(int, 1), default=d.steps, metavar="N",
                   help=f"number of guided denoising steps (default {d.steps}); each costs one decoder backward pass")
    p.add_argument("--guidance-start", type=number(float, 0.0, 1.0), default=d.start, metavar="F",
                   help=f"spread the guided steps from this fraction of the trajectory to its end (default {d.start:g})")
    p.add_argument("--guidance-renderer", choices=RENDERERS, default=d.renderer,
                   help=f"DRR integrator of the guidance (default {d.renderer}; evaluation always uses siddon)")
    p.add_argument("--refine-steps", type=number(int, 0), default=d.refine_steps, metavar="N",
                   help=f"final voxel-space refinement steps on the DRR mismatch (default {d.refine_steps})")
    p.add_argument("--refine-prior", type=number(float, 0.0), default=d.refine_prior, metavar="L",
                   help=f"weight of the refinement's stay-near-the-generated-CT term (default {d.refine_prior:g})")


def guidance_settings(args: argparse.Namespace) -> GuidanceSettings:
    """The :class:`GuidanceSettings` that :func:`add_guidance_arguments`' options describe."""
    return GuidanceSettings(weight=args.projection_guidance, steps=args.guidance_steps, start=args.guidance_start,
                            refine_steps=args.refine_steps, refine_prior=args.refine_prior,
                            renderer=args.guidance_renderer, quantize=DEFAULT_GUIDANCE.quantize,
                            refine_lr=DEFAULT_GUIDANCE.refine_lr)


def build_parser() -> argparse.ArgumentParser:
    """The ``evaluation.generate_ct`` argument parser."""
    from dataset.prepare import OneLineParser

    p = OneLineParser(prog="python -m evaluation.generate_ct", description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--ap", type=Path, help="AP X-ray (.pt, .png or 2-D .nii[.gz]) in [0, 1]")
    p.add_argument("--lat", type=Path, help="lateral X-ray, same size as --ap")
    p.add_argument("--output", type=Path, help="output NIfTI (HU) for one pair")
    p.add_argument("--manifest", type=Path, help="batch mode: a prepared manifest.csv")
    p.add_argument("--split", default="test", help="batch mode: manifest split (default test)")
    p.add_argument("--output-dir", type=Path, help="batch mode: folder for <subject_id>.nii.gz")
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    p.add_argument("--num-samples", "--num_samples", type=int, default=1)
    add_guidance_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true")
    return p


def _jobs(args: argparse.Namespace) -> list[tuple[str, Path, Path, int | None, Path]]:
    """(name, ap, lat, label, output) for every generation the arguments ask for."""
    single = any(v is not None for v in (args.ap, args.lat, args.output))
    if single == (args.manifest is not None):
        raise ValueError("give either --ap/--lat/--output (one pair) or --manifest/--output-dir (batch), not both")
    if single:
        missing = [f"--{n}" for n in ("ap", "lat", "output") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"one-pair mode needs {', '.join(missing)}")
        return [(args.output.name, args.ap, args.lat, args.label, args.output)]
    if args.output_dir is None:
        raise ValueError("batch mode needs --output-dir")
    frame = Manifest.load(args.manifest).split(args.split)
    if len(frame) == 0:
        raise ValueError(f"{args.manifest}: split {args.split!r} has no subjects")
    return [(r.subject_id, Path(r.ap), Path(r.lat), int(r.label) if args.label is None else args.label,
             args.output_dir / f"{r.subject_id}.nii.gz") for r in frame.itertuples()]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.num_samples < 1 or args.num_inference_steps < 1:
            raise ValueError(f"--num-samples {args.num_samples} and --num-inference-steps "
                             f"{args.num_inference_steps} must be >= 1")
        jobs = _jobs(args)
        check_outputs([p for *_, out in jobs for p in output_paths(out, args.num_samples).values()], args.overwrite)
        gen = load_generator(args)
        # read and check every input before the first (slow) sample
        inputs = []
        for name, ap_path, lat_path, label, out in jobs:
            ap, lat = load_xray(ap_path), load_xray(lat_path)
            if tuple(ap.shape) != tuple(lat.shape):
                raise ValueError(f"{name}: AP {ap_path} is {tuple(ap.shape[1:])} but LAT {lat_path} is "
                                 f"{tuple(lat.shape[1:])}; expected a pair of the same size")
            if gen.needs_xrays:
                gen.check_xrays(ap, lat, name=f"{name} ({ap_path}, {lat_path})")
            inputs.append((name, ap, lat, label, out))
        generator = torch.Generator().manual_seed(args.seed)
        guidance = guidance_settings(args)
        for name, ap, lat, label, out in tqdm(inputs, desc="generate", disable=args.no_progress or len(inputs) == 1):
            volumes = gen.sample(ap, lat, label, args.num_samples, args.sampler, args.num_inference_steps,
                                 args.guidance_scale, generator, projection_guidance=guidance)
            paths = write_generation(gen, volumes, out)
            print(f"{name}: wrote {paths['mean']}" + (f" (+ std and {args.num_samples} samples)"
                                                      if args.num_samples > 1 else ""))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
