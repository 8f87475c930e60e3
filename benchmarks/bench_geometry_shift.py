"""How the demo's model holds up on X-rays taken at other geometries than its training DRRs.

    python -m benchmarks.bench_geometry_shift                       # the demo output folder outputs/demo
    python -m benchmarks.bench_geometry_shift /tmp/demo --cohorts matched sdd1200_sid800_96 --num-samples 2

For every cohort in :data:`COHORTS` a fresh set of demo subjects (``dataset.prepare_demo`` with
``--seed``; the same deformed CTs in every cohort) is rendered at that geometry, and every subject's
CT is generated from its AP + LAT pair by ``python -m evaluation.generate_ct --manifest`` (so the
geometry is read from the cohort's ``dataset.json`` and manifest columns, and X-rays of another
detector size are mapped onto the model's detector in millimetres), with the generator's defaults
(projection guidance included) and ``--num-samples`` samples. Each CT is scored against its ground
truth (PSNR / SSIM on [-1, 1], as the demo), and so is the voxel-wise mean of the demo's training CTs
(the baseline that uses no X-ray). Prints one JSON object: per cohort the geometry, the mean and
per-subject PSNR / SSIM, the baseline, the margin over it and the difference from the ``matched``
cohort (the demo's default geometry).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import environment
from dataset import DatasetInfo, Manifest, image_to_volume, read_ct
from dataset.cli import OneLineParser, number, run_cli

#: Cohorts: ``dataset.prepare_demo`` geometry options (the demo's size and seed are added). ``matched`` is
#: the demo's default geometry; the others change one thing at a time, and ``sdd1200_sid800_96`` is the
#: shorter-throw, finer-detector set-up of the README example.
COHORTS: dict[str, list[str]] = {
    "matched": [],
    "sdd1200_sid800_96": ["--sdd", "1200", "--sid", "800", "--drr-size", "96"],
    "sdd1000": ["--sdd", "1000", "--sid", "800"],
    "sdd1800": ["--sdd", "1800", "--sid", "950"],
    "detector48": ["--drr-size", "48"],
    "detector128": ["--drr-size", "128"],
    "angle3": ["--jitter-angle", "3"],
}


def _unit(path: str | Path, info: DatasetInfo) -> torch.Tensor:
    vol, _ = image_to_volume(read_ct(path))
    return info.window.to_unit(vol.float())


def run(demo: Path, cohorts: Sequence[str], subjects: int, seed: int, num_samples: int, inference_steps: int,
        work: Path) -> dict:
    """Prepare, generate and score every cohort; see the module docstring."""
    from dataset import prepare_demo
    from evaluation import generate_ct
    from evaluation.metrics import psnr, ssim_3d

    ckpt = demo / "biflownet" / "checkpoints" / "last.ckpt"
    demo_data = demo / "data"
    if not ckpt.is_file() or not (demo_data / "dataset.json").is_file():
        raise FileNotFoundError(f"{demo}: no finished demo (expected {ckpt} and {demo_data / 'dataset.json'}); "
                                "run `make demo` or python -m evaluation.demo --out DIR first")
    demo_info = DatasetInfo.load(demo_data)
    size = demo_info.shape[0]
    frame = Manifest.load(demo_data / "manifest.csv").frame
    mean_ct = torch.stack([_unit(p, demo_info) for p in frame[frame.split == "train"].ct]).mean(0)
    demo_summary = demo / "summary.json"
    record: dict = {"benchmark": "geometry_shift", "demo": str(demo), "checkpoint": str(ckpt), "subjects": subjects,
                    "seed": seed, "num_samples": num_samples, "inference_steps": inference_steps,
                    "demo_default_geometry": demo_info.geometry.to_dict() if demo_info.geometry else None,
                    "demo_x2ct_psnr_db": (json.loads(demo_summary.read_text()).get("x2ct_psnr_db")
                                          if demo_summary.is_file() else None),
                    "cohorts": {}, **environment(torch.device("cpu"))}
    for name in cohorts:
        t0 = time.perf_counter()
        data, out = work / name / "data", work / name / "generated"
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
            code = prepare_demo.main(["--out", str(data), "--subjects", str(subjects), "--seed", str(seed), "--size",
                                      str(size), "--no-progress", *COHORTS[name]])
        if code != 0:
            raise ValueError(f"cohort {name}: prepare_demo failed (exit {code}, see above)")
        info = DatasetInfo.load(data)
        rows = Manifest.load(data / "manifest.csv").frame
        for split in sorted(set(rows.split)):
            with contextlib.redirect_stdout(sys.stderr):
                code = generate_ct.main(["--checkpoint", str(ckpt), "--manifest", str(data / "manifest.csv"),
                                         "--split", split, "--output-dir", str(out), "--num-samples", str(num_samples),
                                         "--num-inference-steps", str(inference_steps), "--seed", str(seed),
                                         "--no-progress", "--overwrite"])
            if code != 0:
                raise ValueError(f"cohort {name}: generate_ct failed on split {split} (exit {code}, see above)")
        per = {}
        for row in rows.itertuples():
            ref = _unit(row.ct, info)
            pred = _unit(out / f"{row.subject_id}.nii.gz", info)
            per[row.subject_id] = {"psnr_db": float(psnr(pred, ref)), "ssim": float(ssim_3d(pred[None], ref[None])),
                                   "baseline_psnr_db": float(psnr(mean_ct, ref))}
        mean = {k: sum(v[k] for v in per.values()) / len(per) for k in ("psnr_db", "ssim", "baseline_psnr_db")}
        geometry = info.geometry.to_dict() if info.geometry else None
        record["cohorts"][name] = {"options": COHORTS[name], "geometry": geometry,
                                   "geometry_jitter": info.extra.get("geometry_jitter"), **mean,
                                   "margin_over_baseline_db": mean["psnr_db"] - mean["baseline_psnr_db"],
                                   "seconds": round(time.perf_counter() - t0, 1), "per_subject": per}
        print(f"bench_geometry_shift: {name}: PSNR {mean['psnr_db']:.2f} dB, baseline {mean['baseline_psnr_db']:.2f} dB",
              file=sys.stderr, flush=True)
    matched = record["cohorts"].get("matched")
    for c in record["cohorts"].values():
        c["vs_matched_db"] = c["psnr_db"] - matched["psnr_db"] if matched else None
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.bench_geometry_shift", description=__doc__.split("\n\n")[0])
    p.add_argument("demo", nargs="?", type=Path, default=Path("outputs/demo"), help="finished demo output folder")
    p.add_argument("--cohorts", nargs="+", choices=list(COHORTS), default=list(COHORTS))
    p.add_argument("--subjects", type=number(int, min=3), default=8, help="subjects per cohort")
    p.add_argument("--seed", type=number(int, min=0), default=5, help="cohort seed (the demo trains on seed 0)")
    p.add_argument("--num-samples", type=number(int, min=1), default=4, help="samples per subject (mean is scored)")
    p.add_argument("--inference-steps", type=number(int, min=1), default=25, help="DDIM steps (the demo's)")
    p.add_argument("--work", type=Path, default=None, help="keep the cohorts here (default: a temporary folder)")
    p.add_argument("--threads", type=number(int, min=1), default=None, help="torch threads (default torch's)")
    args = p.parse_args(argv)

    def work() -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        folder = args.work or Path(tempfile.mkdtemp(prefix="geometry_shift_"))
        try:
            record = run(args.demo, args.cohorts, args.subjects, args.seed, args.num_samples, args.inference_steps,
                         folder)
        finally:
            if args.work is None:
                shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(record, indent=2))

    return run_cli(p.prog, work)


if __name__ == "__main__":
    sys.exit(main())
