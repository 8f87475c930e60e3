"""Projection-guidance settings side by side on a finished demo: CT quality, re-projection and cost of each.

    python -m benchmarks.bench_guidance                              # outputs/demo, the settings below
    python -m benchmarks.bench_guidance /tmp/demo --settings 0 0.5:4 1:2:20 --num-samples 2 --limit 3

Every held-out test subject of the demo is generated from its AP + LAT DRRs (each with its own geometry, as
the demo does) once per setting, from the same noise, with the demo's networks and sampler (DDIM,
``--inference-steps``). A setting is ``WEIGHT[:STEPS[:REFINE_STEPS[:START]]]`` in ``generate_ct``'s terms
(``--projection-guidance``, ``--guidance-steps``, ``--refine-steps``, ``--guidance-start``; omitted parts
take ``generate_ct``'s defaults); ``0`` is unguided sampling. Each setting's CTs are scored exactly as the
demo scores its own (``evaluation.evaluate``: PSNR, SSIM, MAE, lung / bone Dice, and the DRR consistency
with each subject's geometry), and timed (seconds per volume). Prints one JSON object: per setting the
means, the difference from the unguided setting and the time ratio to it; the default setting is marked.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.common import environment
from dataset.cli import OneLineParser, number, run_cli

DEFAULT_SETTINGS = ("0", "0.5:2", "0.5:4", "1:4", "0.5:8", "0.5:4:20")
KEYS = ("psnr_db", "ssim_3d", "mae_hu", "lung_dice", "bone_dice", "drr_ap_psnr_db", "drr_lat_psnr_db")


def parse_setting(text: str):
    """``WEIGHT[:STEPS[:REFINE_STEPS[:START]]]`` -> :class:`evaluation.projection_guidance.GuidanceSettings`."""
    from evaluation.projection_guidance import DEFAULT_GUIDANCE

    parts = text.split(":")
    if not 1 <= len(parts) <= 4 or any(not p for p in parts):
        raise ValueError(f"--settings {text!r}; expected WEIGHT[:STEPS[:REFINE_STEPS[:START]]], e.g. 0.5:4")
    try:
        weight = float(parts[0])
        steps = int(parts[1]) if len(parts) > 1 else DEFAULT_GUIDANCE.steps
        refine = int(parts[2]) if len(parts) > 2 else DEFAULT_GUIDANCE.refine_steps
        start = float(parts[3]) if len(parts) > 3 else DEFAULT_GUIDANCE.start
    except ValueError:
        raise ValueError(f"--settings {text!r}; expected WEIGHT[:STEPS[:REFINE_STEPS[:START]]] with a number "
                         "weight and start and whole step counts, e.g. 0.5:4:0:0.5") from None
    return replace(DEFAULT_GUIDANCE, weight=weight, steps=steps, refine_steps=refine, start=start)  # validated


def run(demo: Path, settings: Sequence[str], num_samples: int, inference_steps: int, seed: int, limit: int | None,
        work: Path) -> dict:
    """Generate, score and time every setting; see the module docstring."""
    from dataset import DatasetInfo, Manifest
    from evaluation.demo import generate_split
    from evaluation.evaluate import evaluate_pairs, find_pairs
    from evaluation.generation import CTGenerator
    from evaluation.metrics import drr_consistency
    from evaluation.projection_guidance import DEFAULT_GUIDANCE
    from evaluation.xray_inputs import manifest_geometries

    parsed = {text: parse_setting(text) for text in settings}
    ckpt, ae_ckpt = demo / "biflownet" / "checkpoints" / "last.ckpt", demo / "autoencoder" / "checkpoints" / "last.ckpt"
    data = demo / "data"
    if not ckpt.is_file() or not ae_ckpt.is_file() or not (data / "manifest.csv").is_file():
        raise FileNotFoundError(f"{demo}: no finished demo (expected {ckpt}, {ae_ckpt} and {data / 'manifest.csv'}); "
                                "run `make demo` or python -m evaluation.demo --out DIR first")
    info = DatasetInfo.load(data)
    manifest = data / "manifest.csv"
    rows = Manifest.load(manifest).frame
    rows = rows[rows.split == "test"]
    if limit:
        rows = rows.iloc[:limit]
    if rows.empty:
        raise ValueError(f"{manifest}: no test subjects to generate")
    gen = CTGenerator.from_checkpoints(ckpt, ae_ckpt, device="cpu")
    geometries = manifest_geometries(manifest, rows)
    record: dict = {"benchmark": "guidance", "demo": str(demo), "subjects": int(len(rows)), "num_samples": num_samples,
                    "inference_steps": inference_steps, "sampler": "ddim", "seed": seed,
                    "default": asdict(DEFAULT_GUIDANCE), "settings": {}, **environment(torch.device("cpu"))}
    for text, setting in parsed.items():
        out = work / text.replace(":", "_")  # the demo's generation: the same noise for every setting
        per_volume, _ = generate_split(gen, rows, geometries, setting, num_samples, inference_steps, seed, out)
        ids = {str(s) for s in rows.subject_id}
        pairs = [p for p in find_pairs(out, manifest, split="test") if p.subject_id in ids]
        _, ev = evaluate_pairs(pairs, info.window, info.geometry)
        means = {k: ev["metrics"][k]["mean"] for k in KEYS if k in ev["metrics"]}
        drr = drr_consistency(means)
        if drr is not None:
            means["drr_consistency_psnr_db"] = drr
        record["settings"][text] = {"guidance": asdict(setting), "default": asdict(setting) == asdict(DEFAULT_GUIDANCE),
                                    "seconds_per_volume": per_volume, **means}
        print(f"bench_guidance: {text}: PSNR {means['psnr_db']:.2f} dB, DRR consistency "
              f"{means.get('drr_consistency_psnr_db', float('nan')):.2f} dB, "
              f"{record['settings'][text]['seconds_per_volume']:.2f} s/volume", file=sys.stderr, flush=True)
    unguided = next((v for v in record["settings"].values() if v["guidance"]["weight"] == 0), None)
    for v in record["settings"].values():
        v["vs_unguided"] = None if unguided is None else {
            **{f"{k}_delta": v[k] - unguided[k] for k in ("psnr_db", "ssim_3d", "drr_consistency_psnr_db")
               if k in v and k in unguided},
            "time_ratio": v["seconds_per_volume"] / unguided["seconds_per_volume"]}
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.bench_guidance", description=__doc__.split("\n\n")[0])
    p.add_argument("demo", nargs="?", type=Path, default=Path("outputs/demo"), help="finished demo output folder")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                   help="WEIGHT[:STEPS[:REFINE_STEPS[:START]]] per setting (0: unguided); default: "
                        + " ".join(DEFAULT_SETTINGS))
    p.add_argument("--num-samples", type=number(int, min=1), default=4, help="samples per subject (mean is scored)")
    p.add_argument("--inference-steps", type=number(int, min=1), default=25, help="DDIM steps (the demo's)")
    p.add_argument("--seed", type=number(int, min=0), default=0)
    p.add_argument("--limit", type=number(int, min=1), default=None, help="first N test subjects only")
    p.add_argument("--threads", type=number(int, min=1), default=None, help="torch threads (default torch's)")
    args = p.parse_args(argv)

    def work() -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        for text in args.settings:  # bad settings are refused before anything runs
            parse_setting(text)
        folder = Path(tempfile.mkdtemp(prefix="bench_guidance_"))
        try:
            with contextlib.redirect_stdout(sys.stderr):
                record = run(args.demo, args.settings, args.num_samples, args.inference_steps, args.seed, args.limit,
                             folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(record))

    return run_cli(p.prog, work)


if __name__ == "__main__":
    sys.exit(main())
