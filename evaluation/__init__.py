"""Generation CLIs, metrics (thin wrappers over ``monai.metrics``), MPR figures and the evaluation CLI."""

from dataset.lazy import lazy_exports

from evaluation.figures import mpr_figure, save_mpr_figure
from evaluation.metrics import (
    check_finite,
    extract_features,
    fid,
    fid_min_samples,
    mae_hu,
    mmd,
    psnr,
    reprojection_metrics,
    slice_psnr,
    slice_ssim,
    ssim_2d,
    ssim_3d,
    volume_metrics,
)

# evaluation.evaluate is also run as ``python -m evaluation.evaluate``; importing it here would make runpy
# warn that the module was imported before being executed, so its names load on first use.
__getattr__ = lazy_exports(__name__, {name: "evaluation.evaluate" for name in (
    "CasePair", "evaluate_pairs", "find_pairs", "write_results")})


__all__ = [
    "CasePair",
    "check_finite",
    "evaluate_pairs",
    "extract_features",
    "fid",
    "fid_min_samples",
    "find_pairs",
    "mae_hu",
    "mmd",
    "mpr_figure",
    "psnr",
    "reprojection_metrics",
    "save_mpr_figure",
    "slice_psnr",
    "slice_ssim",
    "ssim_2d",
    "ssim_3d",
    "volume_metrics",
    "write_results",
]
