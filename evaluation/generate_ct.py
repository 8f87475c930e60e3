"""``python -m evaluation.generate_ct``: a CT volume (NIfTI, HU) from an AP + lateral X-ray pair.

Single pair::

    python -m evaluation.generate_ct --checkpoint biflownet.ckpt --ap AP.pt --lat LAT.pt --output ct.nii.gz

Batch over a manifest split (one ``<subject_id>.nii.gz`` per subject)::

    python -m evaluation.generate_ct --checkpoint biflownet.ckpt --manifest data/manifest.csv --split test \
        --output-dir generated/

X-rays may be DICOM (CR / DX / ...), PNG / JPEG / TIFF, 2-D NIfTI or ``.pt``: each is read into the
display convention (DICOM tags, ``--ap-ops`` / ``--lat-ops``), mapped onto the model's detector in
millimetres (``--pixel-spacing`` / ``--sdd`` / ``--sid`` for files without tags) and matched to the
training X-ray intensity with ``--harmonize auto`` (off by default); the steps are printed and written to ``<name>.json``
beside each output. ``--preview PNG`` draws the pair as the model receives it (alone, without
``--output`` / ``--output-dir``, it samples nothing). With ``--num-samples K > 1`` the output is the mean of K samples, written beside
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

from dataset import Manifest, write_nifti
from dataset.io import check_writable
from dataset.cli import OneLineParser, number, parse_device, run_cli
from dataset.drr import RENDERERS
from evaluation.generation import SAMPLERS, CTGenerator
from evaluation.projection_guidance import DEFAULT_GUIDANCE, GuidanceSettings
from evaluation.xray_inputs import (XrayOptions, add_xray_arguments, check_side_outputs, intensity_reference,
                                    manifest_geometries, prepare_pair, sample_kwargs, save_preview, sidecar,
                                    training_geometry, write_sidecar)

PROG = "python -m evaluation.generate_ct"


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
        check_writable(p)


def write_generation(gen: CTGenerator, volumes: torch.Tensor, output: Path) -> dict[str, Path]:
    """Write the mean (and, for K > 1, std and samples) of ``(K, 1, D, H, W)`` volumes in [-1, 1] as HU NIfTI.

    Non-finite volumes are refused before anything is written, and a set that fails part way is removed
    (each file is written atomically, and the set is all or nothing).
    """
    bad = int((~torch.isfinite(volumes)).sum())
    if bad:
        raise ValueError(f"{output}: the generated volume has {bad} NaN or Inf voxels; nothing written (expected a "
                         "finite CT: the model or its inputs give non-finite values)")
    paths = output_paths(output, volumes.shape[0])
    output.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(paths["mean"], lambda: gen.to_hu_image(volumes.mean(dim=0)))]
    if volumes.shape[0] > 1:
        jobs.append((paths["std"], lambda: gen.std_hu_image(volumes)))
        jobs += [(paths[f"sample{k}"], lambda k=k: gen.to_hu_image(volumes[k])) for k in range(volumes.shape[0])]
    written: list[Path] = []
    try:
        for path, image in jobs:
            write_nifti(image(), path)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return paths


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpoint, sampler and device options shared by the generation CLIs (read by :func:`load_generator`)."""
    p.add_argument("--checkpoint", "--model-ckpt", type=Path, required=True, help="BiFlowNet checkpoint (.ckpt)")
    p.add_argument("--autoencoder", "--AE-ckpt", type=Path, default=None,
                   help="autoencoder checkpoint (default: the one recorded in --checkpoint)")
    p.add_argument("--adapter", type=Path, default=None,
                   help="LoRA adapter folder trained on --checkpoint (merged before sampling)")
    p.add_argument("--num-inference-steps", "--num_inference_steps", type=number(int, min=1), default=50)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--guidance-scale", "--guidance_scale", type=number(float, min=0.0), default=1.0,
                   help="classifier-free guidance (1: the conditional model alone; needs a model trained with "
                        "condition dropout)")
    p.add_argument("--seed", type=number(int, min=0), default=0)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--fp32", action="store_true", help="disable bf16 autocast on CUDA")


def load_generator(args: argparse.Namespace) -> CTGenerator:
    """The :class:`CTGenerator` that :func:`add_model_arguments`' options describe."""
    return CTGenerator.from_checkpoints(args.checkpoint, args.autoencoder, parse_device(args.device),
                                        bf16=False if args.fp32 else None, adapter=args.adapter)


def check_options(gen: CTGenerator, checkpoint: Path, label: int | None, guidance_scale: float,
                  xrays: bool) -> None:
    """Refuse options the model would ignore or cannot honour, naming the option and the model.

    Args:
        gen: the loaded generator.
        checkpoint: its checkpoint (for messages).
        label: the ``--label`` given (None: not given).
        guidance_scale: ``--guidance-scale``.
        xrays: whether X-rays are given.
    """
    classes = gen.num_classes
    if label is not None and classes == 0:
        raise ValueError(f"--label {label}: {checkpoint} has no class condition (network.num_classes=0); drop --label")
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"--label {label}: {checkpoint} knows classes 0..{classes - 1}")
    if xrays and not gen.needs_xrays:
        raise ValueError(f"{checkpoint} is not conditioned on X-rays; generate with "
                         "python -m evaluation.class_conditional_generation")
    if not xrays and gen.needs_xrays and not gen.biflownet.conditioning.get("p_uncond"):
        raise ValueError(f"{checkpoint} was trained without condition dropout (module.p_uncond=0), so it cannot "
                         "sample without X-rays")
    if guidance_scale != 1.0:
        has_condition = (xrays and gen.needs_xrays) or (label is not None and classes > 0)
        if not has_condition:
            raise ValueError(f"--guidance-scale {guidance_scale:g}: nothing to guide towards (no X-rays or class "
                             "label for this model); use 1")
        if not gen.biflownet.conditioning.get("p_uncond"):
            raise ValueError(f"--guidance-scale {guidance_scale:g}: {checkpoint} was trained without condition dropout "
                             "(module.p_uncond=0), so it has no unconditional prediction to guide with; use 1")


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
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--ap", type=Path, help="AP (or PA) X-ray: DICOM, .png/.jpg/.tif, 2-D .nii[.gz] or .pt")
    p.add_argument("--lat", type=Path, help="lateral X-ray, same formats")
    p.add_argument("--output", type=Path, help="output NIfTI (HU) for one pair")
    p.add_argument("--manifest", type=Path, help="batch mode: a prepared manifest.csv")
    p.add_argument("--split", default="test", help="batch mode: manifest split (default test)")
    p.add_argument("--output-dir", type=Path, help="batch mode: folder for <subject_id>.nii.gz")
    p.add_argument("--label", type=number(int, min=0), default=None,
                   help="class label (class-conditional models only; batch mode default: the manifest's label)")
    p.add_argument("--num-samples", "--num_samples", type=number(int, min=1), default=1)
    add_guidance_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true")
    add_xray_arguments(p)
    return p


def _jobs(args: argparse.Namespace) -> list[tuple[str, Path, Path, int | None, Path | None]]:
    """(name, ap, lat, label, output) for every generation the arguments ask for (output None: preview only)."""
    single = any(v is not None for v in (args.ap, args.lat, args.output))
    if single == (args.manifest is not None):
        raise ValueError("give either --ap/--lat/--output (one pair) or --manifest/--output-dir (batch), not both")
    if single:
        missing = [f"--{n}" for n in ("ap", "lat", "output") if getattr(args, n) is None
                   and not (n == "output" and args.preview is not None)]
        if missing:
            raise ValueError(f"one-pair mode needs {', '.join(missing)}")
        return [(args.output.name if args.output else args.ap.name, args.ap, args.lat, args.label, args.output)]
    if args.output_dir is None and args.preview is None:
        raise ValueError("batch mode needs --output-dir")
    frame = Manifest.load(args.manifest).split(args.split)
    if len(frame) == 0:
        raise ValueError(f"{args.manifest}: split {args.split!r} has no subjects")
    return [(r.subject_id, Path(r.ap), Path(r.lat), int(r.label) if args.label is None else args.label,
             args.output_dir / f"{r.subject_id}.nii.gz" if args.output_dir is not None else None)
            for r in frame.itertuples()]


def generate(args: argparse.Namespace) -> None:
    """Check every input and output, then sample and write each job (see the module docstring)."""
    jobs = _jobs(args)
    options = XrayOptions.from_args(args)
    outputs = [p for *_, out in jobs if out is not None for p in output_paths(out, args.num_samples).values()]
    check_outputs(outputs, args.overwrite)
    check_side_outputs([sidecar(out) for *_, out in jobs if out is not None], args.preview, args.overwrite)
    gen = load_generator(args)
    check_options(gen, args.checkpoint, args.label, args.guidance_scale, xrays=True)
    known = manifest_geometries(args.manifest, Manifest.load(args.manifest).split(args.split)) \
        if args.manifest is not None else {}
    geometry, reference = training_geometry(gen.biflownet), intensity_reference(gen.biflownet)
    # read and check every input before the first (slow) sample
    inputs = []
    for name, ap_path, lat_path, label, out in jobs:
        pair = prepare_pair(ap_path, lat_path, gen.biflownet.conditioning["xray_size"], geometry, reference,
                            options, known.get(name))
        gen.check_xrays(pair.ap.image, pair.lat.image, name=f"{name} ({ap_path}, {lat_path})")
        if gen.num_classes > 0 and label is None:
            raise ValueError(f"{args.checkpoint} is class-conditional ({gen.num_classes} classes): pass --label L")
        print("\n".join(f"{name}: {step}" for step in pair.steps))
        inputs.append((name, pair, label if gen.num_classes > 0 else None, out))
        if out is None:
            break  # preview only: nothing else to read
    if args.preview is not None:  # written once every input has passed its checks
        name, pair = inputs[0][:2]
        save_preview(args.preview, pair, reference, title=f"{name}: the X-rays as the model receives them")
        print(f"{name}: preview {args.preview}")
    generator = torch.Generator().manual_seed(args.seed)
    todo = [job for job in inputs if job[3] is not None]
    for name, pair, label, out in tqdm(todo, desc="generate", disable=args.no_progress or len(todo) <= 1):
        volumes = gen.sample(pair.ap.image, pair.lat.image, label, args.num_samples, args.sampler,
                             args.num_inference_steps, args.guidance_scale, generator,
                             projection_guidance=guidance_settings(args), **sample_kwargs(gen, pair))
        paths = write_generation(gen, volumes, out)
        write_sidecar(out, pair, {"checkpoint": str(args.checkpoint), "seed": args.seed,
                                  "num_samples": args.num_samples})
        print(f"{name}: wrote {paths['mean']}" + (f" (+ std and {args.num_samples} samples)"
                                                  if args.num_samples > 1 else "") + f", steps in {sidecar(out)}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
