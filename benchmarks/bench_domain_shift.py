"""How much a radiograph look costs: the demo's held-out pairs restyled, with and without harmonisation.

    python -m benchmarks.bench_domain_shift                      # the demo output folder outputs/demo
    python -m benchmarks.bench_domain_shift /tmp/demo --num-samples 2 --styles clean gamma_1.6 dicom

For every held-out test subject of a finished demo (``python -m evaluation.demo --out DIR``), the
AP + LAT DRRs are given to the demo's model clean and restyled (fixed
:class:`dataset.radiograph_style.RadiographStyle` parameters, see :data:`STYLES`), and once as a
processed-looking DICOM pair written with pydicom (``dicom``): the test CT re-rendered on a finer,
non-square detector (pitch 0.6 x 0.5 of the training one, 140 x 160 pixels: a larger field than the
training detector), processed (the ``processed`` style), stored MONOCHROME1 in 12 bits with a bright
collimator band, the AP stored mirrored with Patient Orientation ``R\\F``. Each input goes through
the same path as ``generate_ct`` (:func:`evaluation.xray_inputs.prepare_pair`) with ``--harmonize
none`` and ``auto``; the generated CT (mean of K samples, the same noise for every style) is scored
against the ground truth (PSNR / SSIM on [-1, 1], as the demo). Prints one JSON object: per style and
harmonisation the mean and per-subject PSNR / SSIM, and the drop from the clean-DRR result.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment
from dataset import DatasetInfo, Manifest, image_to_volume, read_ct, read_radiograph, render_drr_pair
from dataset.cli import OneLineParser, number, run_cli
from dataset.drr import DRRGeometry
from dataset.radiograph_style import RadiographStyle

#: Fixed styles (RadiographStyle.apply parameters); "dicom" is the processed style written as DICOM.
STYLES = {
    "clean": {},
    "gamma_0.6": {"gamma": 0.6},
    "gamma_1.6": {"gamma": 1.6},
    "unsharp": {"unsharp_amount": 1.5, "unsharp_sigma": 0.05},
    "blur_noise": {"blur_sigma": 1.0, "noise_std": 0.02},
    "display_lut": {"lut_centre": 0.45, "lut_width": 0.15},
    "exposure": {"gain": 0.85, "offset": 0.04},
    "processed": {"blur_sigma": 0.7, "noise_std": 0.01, "gamma": 1.4, "unsharp_amount": 1.0, "unsharp_sigma": 0.05,
                  "lut_centre": 0.5, "lut_width": 0.2},
    "dicom": {},
}
#: The DICOM detector relative to the training one: pitch factor (row, col) and pixels.
DICOM_PITCH, DICOM_SIZE = (0.6, 0.5), (140, 160)
TARGET_DB = 0.5


def write_dicom_pair(folder: Path, volume: torch.Tensor, info: DatasetInfo, seed: int) -> tuple[Path, Path]:
    """Render ``volume`` ``(1, D, H, W)`` on the finer, larger detector and write the processed DICOM pair."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    g = info.geometry
    views = {v: g.view(v) for v in ("AP", "LAT")}
    fine = DRRGeometry(*(type(views[v])(views[v].sdd, views[v].sid, DICOM_SIZE,
                                        (views[v].pixel_spacing[0] * DICOM_PITCH[0], views[v].pixel_spacing[1] * DICOM_PITCH[1]))
                         for v in ("AP", "LAT")), g.wet_scale_mm)
    with torch.no_grad():
        ap, lat = render_drr_pair(volume, info.spacing, fine, info.window)
    paths = []
    for view, image in (("AP", ap), ("LAT", lat)):
        params = {**STYLES["processed"], "blur_sigma": STYLES["processed"]["blur_sigma"] / min(DICOM_PITCH),
                  "noise_seed": seed}
        x = RadiographStyle.apply(image, params)[0].numpy()
        stored = np.round((1.0 - x) * 4095).astype(np.uint16)  # MONOCHROME1, 12 bits
        stored[-10:, :] = 0  # a collimator blade across the bottom: full attenuation, bright
        orientation = ["L", "F"] if view == "AP" else ["P", "F"]
        if view == "AP":
            stored, orientation = stored[:, ::-1], ["R", "F"]  # stored mirrored, and the tag says so
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PresentationIntentType = "DX", "FOR PRESENTATION"
        ds.ViewPosition = "AP" if view == "AP" else "LL"
        ds.PatientOrientation = orientation
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        v = fine.view(view)
        ds.ImagerPixelSpacing = [f"{p:.6f}" for p in v.pixel_spacing]
        ds.DistanceSourceToDetector = f"{v.sdd:.2f}"
        ds.EstimatedRadiographicMagnificationFactor = f"{v.sdd / v.sid:.6f}"
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        path = folder / f"{view}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths[0], paths[1]


@torch.no_grad()
def sample_batch(gen, aps: torch.Tensor, lats: torch.Tensor, noise: torch.Tensor, steps: int,
                 geometry: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM volumes for a batch of conditions: ``(B, 1, H, W)`` X-rays, ``(B, C, d, h, w)`` starting noise.

    The same computation as ``CTGenerator.sample`` (guidance 1, deterministic DDIM, no projection guidance)
    with one condition per batch row, so that every style of a subject is sampled in one batch from the
    same noise. ``geometry``: ``(B, 2, 10)`` packed geometry of each pair (None: the training geometry).
    Returns ``(B, 1, D, H, W)`` in [-1, 1].
    """
    from ddpm import guided

    cond = {"geometry": geometry.to(gen.device)} if geometry is not None else {}
    model_fn = guided(gen.biflownet.model, 1.0, ap=aps.to(gen.device), lat=lats.to(gen.device), **cond)
    z = gen.biflownet.diffusion.sample(model_fn, noise.to(gen.device), None, num_inference_steps=steps, sampler="ddim")
    return torch.cat([gen.autoencoder.decode(gen.biflownet.denormalize(z[i:i + 1].float()), quantize=True).clamp(-1, 1)
                      for i in range(z.shape[0])]).cpu()


def run(out: Path, styles: Sequence[str], harmonize: Sequence[str], num_samples: int, steps: int, seed: int,
        limit: int | None, checkpoint: Path | None = None, batch_size: int = 16) -> dict:
    """Generate and score every (subject, style, harmonisation); returns the JSON record."""
    from evaluation.generation import CTGenerator
    from evaluation.metrics import volume_metrics
    from evaluation.xray_inputs import (XrayOptions, intensity_reference, manifest_geometries, prepare_pair,
                                        training_geometry)

    data = out / "data"
    checkpoint = checkpoint or out / "biflownet" / "checkpoints" / "last.ckpt"
    if not (data / "manifest.csv").is_file() or not checkpoint.is_file():
        raise FileNotFoundError(f"{out}: no finished demo (expected data/manifest.csv and {checkpoint}); "
                                f"run python -m evaluation.demo --out {out}")
    info = DatasetInfo.load(data)
    test = Manifest.load(data / "manifest.csv").split("test")
    if limit:
        test = test.iloc[:limit]
    own = manifest_geometries(data / "manifest.csv", test)  # each pair's own (possibly jittered) geometry
    gen = CTGenerator.from_checkpoints(checkpoint, device="cpu")
    cfg = gen.biflownet.conditioning
    size = cfg["xray_size"]
    geometry, reference = training_geometry(gen.biflownet), intensity_reference(gen.biflownet)
    stored_reference = reference is not None
    if reference is None and "auto" in harmonize:
        from dataset import IntensityReference

        reference = IntensityReference.from_manifest(data / "manifest.csv")  # a checkpoint from before the stats
    configs = [(s, h) for s in styles for h in harmonize]
    results: dict[str, dict[str, list]] = {s: {h: [] for h in harmonize} for s in styles}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, row in enumerate(test.itertuples()):
            volume, _ = image_to_volume(read_ct(row.ct))
            ref = info.window.to_unit(volume.float())
            aps, lats, geoms = [], [], []
            for style in styles:
                folder = tmp / f"{row.subject_id}_{style}"
                folder.mkdir()
                if style == "dicom":
                    ap, lat = write_dicom_pair(folder, ref, info, seed + i)
                    known = None
                else:
                    ap, lat = folder / "AP.pt", folder / "LAT.pt"
                    for path, source in ((ap, row.ap), (lat, row.lat)):
                        torch.save(RadiographStyle.apply(read_radiograph(source).image,
                                                         {**STYLES[style], "noise_seed": seed + i}), path)
                    known = own.get(str(row.subject_id), info.geometry)
                for h in harmonize:
                    inputs = prepare_pair(ap, lat, size, geometry, reference, XrayOptions(harmonize=h), known)
                    gen.check_xrays(inputs.ap.image, inputs.lat.image)
                    aps.append(inputs.ap.image)
                    lats.append(inputs.lat.image)
                    geoms.append((inputs.geometry or geometry).to_tensor() if (inputs.geometry or geometry) else None)
            # the noise CTGenerator.sample would draw with this seed, shared by every style: a paired comparison
            noise = torch.randn((num_samples, cfg["latent_channels"], *cfg["latent_shape"]),
                                generator=torch.Generator().manual_seed(seed + i))
            rows = [(c, k) for c in range(len(configs)) for k in range(num_samples)]
            volumes = []
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                packed = [geoms[c] for c, _ in part]
                volumes.append(sample_batch(gen, torch.stack([aps[c] for c, _ in part]),
                                            torch.stack([lats[c] for c, _ in part]),
                                            torch.stack([noise[k] for _, k in part]), steps,
                                            torch.stack(packed) if all(g is not None for g in packed) else None))
            volumes = torch.cat(volumes).reshape(len(configs), num_samples, *volumes[0].shape[1:])
            for (style, h), samples in zip(configs, volumes):
                m = volume_metrics(samples.mean(0), ref, info.window)
                results[style][h].append({"subject": row.subject_id, "psnr_db": float(m["psnr_db"]),
                                          "ssim": float(m["ssim_3d"])})
                print(f"[{time.perf_counter() - t0:6.0f} s] {row.subject_id} {style:12s} {h:4s} "
                      f"PSNR {m['psnr_db']:.2f} dB SSIM {m['ssim_3d']:.3f}", file=sys.stderr, flush=True)
    summary: dict = {}
    base = np.mean([r["psnr_db"] for r in results["clean"]["none"]]) if "clean" in results and "none" in harmonize else None
    for style, by_h in results.items():
        summary[style] = {}
        for h, rows in by_h.items():
            psnr = float(np.mean([r["psnr_db"] for r in rows]))
            entry = {"psnr_db": psnr, "ssim": float(np.mean([r["ssim"] for r in rows])), "per_subject": rows}
            if base is not None:
                entry["drop_db"] = float(base - psnr)
                entry["within_target"] = bool(base - psnr <= TARGET_DB)
            summary[style][h] = entry
    return {
        "benchmark": "domain_shift",
        "results": summary,
        "clean_drr_psnr_db": None if base is None else float(base),
        "target": f"every style within {TARGET_DB} dB PSNR of the clean-DRR result (clean, harmonize none)",
        "styles": {s: STYLES[s] for s in styles},
        "dicom": {"pitch_factor": list(DICOM_PITCH), "size": list(DICOM_SIZE), "photometric": "MONOCHROME1",
                  "bits_stored": 12, "ap_stored": "mirrored, Patient Orientation R\\F", "style": "processed",
                  "collimator": "bottom 10 rows at full attenuation"},
        "settings": {"demo": str(out), "checkpoint": str(checkpoint), "step": int(cfg.get("step", 0)),
                     "subjects": int(len(test)), "num_samples": num_samples, "sampler": "ddim",
                     "inference_steps": steps, "seed": seed, "harmonize": list(harmonize),
                     "reference": "checkpoint" if stored_reference else "manifest (the checkpoint stores none)",
                     "network_xray": gen.biflownet.hparams.get("network", {}).get("xray")},
        "wall_s": time.perf_counter() - t0,
        "environment": environment(torch.device("cpu")),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m benchmarks.bench_domain_shift", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", type=Path, default=Path("outputs/demo"), help="demo output folder")
    p.add_argument("--styles", nargs="+", choices=list(STYLES), default=list(STYLES))
    p.add_argument("--harmonize", nargs="+", choices=["none", "auto"], default=["none", "auto"])
    p.add_argument("--num-samples", type=number(int, min=1), default=4, help="samples per subject (mean is scored)")
    p.add_argument("--inference-steps", type=number(int, min=1), default=25, help="DDIM steps")
    p.add_argument("--seed", type=number(int, min=0), default=0)
    p.add_argument("--limit", type=number(int, min=1), default=None, help="first N test subjects only")
    p.add_argument("--checkpoint", type=Path, default=None, help="BiFlowNet checkpoint (default OUT/biflownet/checkpoints/"
                   "last.ckpt)")
    p.add_argument("--batch-size", type=number(int, min=1), default=16, help="conditions per sampling batch")
    p.add_argument("--threads", type=number(int, min=1), default=None, help="torch threads (default torch's)")
    args = p.parse_args(argv)

    def work() -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        record = run(args.out, args.styles, args.harmonize, args.num_samples, args.inference_steps, args.seed,
                     args.limit, args.checkpoint, args.batch_size)
        print(json.dumps(record, indent=2))

    return run_cli(p.prog, work)


if __name__ == "__main__":
    sys.exit(main())
