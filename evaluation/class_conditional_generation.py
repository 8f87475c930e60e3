"""``python -m evaluation.class_conditional_generation``: N CT volumes (NIfTI, HU) by class, or unconditionally.

::

    python -m evaluation.class_conditional_generation --checkpoint biflownet.ckpt --output-dir samples/ \
        --num-volumes 8 --label 1 --guidance-scale 2.0

Writes ``<output-dir>/class<label>_<i>.nii.gz`` (``sample_<i>.nii.gz`` for a model without classes).
A class-conditional model needs ``--label`` (or ``--all-labels`` for N volumes of every class). A model
trained on X-rays generates unconditionally here, from the learned null X-ray tokens its condition
dropout trained (this drops its class condition too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from dataset import write_nifti
from dataset.cli import OneLineParser, number, run_cli
from evaluation.generate_ct import add_model_arguments, check_options, check_outputs, load_generator

PROG = "python -m evaluation.class_conditional_generation"


def build_parser() -> argparse.ArgumentParser:
    """The ``evaluation.class_conditional_generation`` argument parser."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--num-volumes", type=number(int, min=1), default=4, help="volumes per label")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--label", type=number(int, min=0), default=None, help="class label to generate")
    labels.add_argument("--all-labels", action="store_true", help="--num-volumes of every class")
    p.add_argument("--batch-size", type=number(int, min=1), default=None,
                   help="volumes per network batch (default all at once; lower it when memory is short)")
    p.add_argument("--overwrite", action="store_true")
    return p


def generate(args) -> None:
    """Check the options against the model, then sample and write every volume."""
    gen = load_generator(args)
    if args.all_labels and gen.num_classes == 0:
        raise ValueError(f"--all-labels: {args.checkpoint} has no class condition (network.num_classes=0)")
    if gen.num_classes > 0 and gen.needs_xrays and (args.label is not None or args.all_labels):
        raise ValueError(f"--label/--all-labels: {args.checkpoint} is conditioned on X-rays too; without X-rays it "
                         "samples from its null condition, which drops the class as well")
    check_options(gen, args.checkpoint, 0 if args.all_labels else args.label, args.guidance_scale, xrays=False)
    if gen.num_classes > 0 and not gen.needs_xrays:
        if args.all_labels:
            labels: list[int | None] = list(range(gen.num_classes))
        elif args.label is None:
            raise ValueError(f"{args.checkpoint} is class-conditional ({gen.num_classes} classes): "
                             "pass --label L or --all-labels")
        else:
            labels = [args.label]
    else:
        labels = [None]
    names = {lab: [args.output_dir / (f"sample_{i:04d}.nii.gz" if lab is None else f"class{lab}_{i:04d}.nii.gz")
                   for i in range(args.num_volumes)] for lab in labels}
    check_outputs([p for ps in names.values() for p in ps], args.overwrite)
    generator = torch.Generator().manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for lab in tqdm(labels, desc="labels", disable=len(labels) == 1):
        volumes = gen.sample(label=lab, num_samples=args.num_volumes, sampler=args.sampler,
                             num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                             generator=generator, batch_size=args.batch_size)
        for vol, path in zip(volumes, names[lab]):
            write_nifti(gen.to_hu_image(vol), path)
        print(f"{'unconditional' if lab is None else f'label {lab}'}: wrote {len(volumes)} volumes to {args.output_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
