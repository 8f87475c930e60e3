"""Image-quality metrics for generated CT volumes, with their definitions stated explicitly.

Published X-ray -> CT numbers are hard to compare because papers differ in the PSNR data range, the HU
window and whether PSNR/SSIM are computed over the whole volume or averaged over 2D slices. Every
function here therefore names its input layout, value range and data range, and the two families are
kept apart:

* **Whole-volume** (the numbers this project reports first): PSNR over all voxels of a volume, 3D SSIM
  with a 3D Gaussian window, MAE in HU.
* **X2CT-compatible** (``slice_psnr`` / ``slice_ssim``): 2D PSNR and 2D SSIM computed on every axial
  slice and averaged over slices, as the X2CT-GAN line of work reports. Reported under separate, labelled
  keys, never mixed with the whole-volume numbers.

Volumes are ``(B, C, D, H, W)`` (or a single ``(C, D, H, W)``) float tensors in [-1, 1]: the project's
unit scale, which ``dataset.intensity`` maps linearly onto an HU window ``[hu_min, hu_max]``. Because the
mapping is linear, PSNR on the unit scale with data range 2 equals PSNR in windowed HU with data range
``hu_max - hu_min``; SSIM likewise (its constants scale with the data range).

**Anatomy** (``anatomy_masks`` / ``anatomy_dice``): lung and bone Dice from fixed HU thresholds, computed
the same way on both volumes: the threshold version of the organ Dice that X-ray -> CT papers report
with a segmentation network, runnable without one.

Identical inputs: PSNR is ``+inf`` (no cap). A slice-averaged PSNR is ``+inf`` as soon as one slice is
identical. Non-finite voxels in an input raise ``ValueError`` naming the case.

The wrappers use ``monai.metrics`` (PSNRMetric, SSIMMetric, MAEMetric, FID, MMD) for the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from monai.metrics import DiceMetric, FIDMetric, MAEMetric, MMDMetric, PSNRMetric, SSIMMetric

from dataset.intensity import HUWindow

#: Data range of the project's unit intensity scale [-1, 1].
UNIT_DATA_RANGE = 2.0
#: Data range of X-ray / DRR tensors in [0, 1].
XRAY_DATA_RANGE = 1.0
#: Body / air boundary (HU): halfway between air (-1000) and water (0); lung parenchyma (about -900 to
#: -700 HU) lies below it, every soft tissue above it.
BODY_HU = -500.0
#: Lung (HU): air-like voxels (below this) inside the body.
LUNG_HU = BODY_HU
#: Bone (HU): at or above this. Above soft tissue and unenhanced blood (< 100 HU), below cortical bone
#: (> 700 HU at thin slices), so cortical and dense trabecular bone count even when partial-volume averaged
#: at coarse spacing. Iodine-enhanced blood (150-500 HU) may exceed it: on contrast CTs the bright vessels
#: and heart chambers count as "bone" in both volumes alike.
BONE_HU = 300.0
#: SSIM window used everywhere here: Gaussian, 11 samples per axis, sigma 1.5 (Wang et al. 2004),
#: with the usual constants K1 = 0.01, K2 = 0.03.
SSIM_WIN_SIZE = 11
SSIM_SIGMA = 1.5

__all__ = [
    "SSIM_SIGMA",
    "SSIM_WIN_SIZE",
    "UNIT_DATA_RANGE",
    "XRAY_DATA_RANGE",
    "BODY_HU",
    "BONE_HU",
    "LUNG_HU",
    "anatomy_dice",
    "anatomy_masks",
    "check_finite",
    "drr_consistency",
    "extract_features",
    "fid",
    "fid_min_samples",
    "mae_hu",
    "mmd",
    "psnr",
    "reprojection_metrics",
    "slice_psnr",
    "slice_ssim",
    "ssim_2d",
    "ssim_3d",
    "volume_metrics",
]


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` when ``x`` holds NaN or Inf values.

    Args:
        x: any tensor.
        name: what ``x`` is (case id and role), used in the message.
    """
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf); expected finite numbers")


def _as_batch(x: torch.Tensor, spatial_dims: int, name: str) -> torch.Tensor:
    """Return ``x`` as a float batch ``(B, C, *spatial)``; a single ``(C, *spatial)`` gains B = 1."""
    if x.ndim == spatial_dims + 1:
        x = x.unsqueeze(0)
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected (B, C, {spatial_dims} spatial axes) "
            f"or (C, {spatial_dims} spatial axes)"
        )
    return x.float()


def _pair(
    pred: torch.Tensor, ref: torch.Tensor, spatial_dims: int = 3, name: str = "volume"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a prediction / reference pair: same shape, right rank, finite values."""
    pred = _as_batch(pred, spatial_dims, f"{name} prediction")
    ref = _as_batch(ref, spatial_dims, f"{name} reference")
    if pred.shape != ref.shape:
        raise ValueError(
            f"{name}: prediction shape {tuple(pred.shape)} differs from reference shape {tuple(ref.shape)}"
        )
    check_finite(pred, f"{name} prediction")
    check_finite(ref, f"{name} reference")
    return pred, ref


def _check_window_fits(shape: Sequence[int], win_size: int, name: str) -> None:
    if min(shape) < win_size:
        raise ValueError(
            f"{name}: spatial size {tuple(shape)} is smaller than the SSIM window {win_size}; "
            f"use a smaller win_size or larger images"
        )


def psnr(
    pred: torch.Tensor,
    ref: torch.Tensor,
    data_range: float = UNIT_DATA_RANGE,
    spatial_dims: int = 3,
    name: str = "volume",
) -> torch.Tensor:
    """Whole-image peak signal-to-noise ratio in dB, one value per batch item.

    ``PSNR = 20 log10(data_range) - 10 log10(MSE)`` with the MSE over all channels and voxels of an item.
    Identical items give ``+inf`` (documented, not capped).

    Args:
        pred: ``(B, C, *spatial)`` or ``(C, *spatial)`` with ``spatial_dims`` spatial axes.
        ref: same shape as ``pred``.
        data_range: peak-to-peak range of the signal: 2 for the unit scale [-1, 1] (equivalent to the HU
            window width when computed in HU), 1 for X-rays in [0, 1].
        spatial_dims: 3 for volumes ``(D, H, W)``, 2 for images ``(H, W)``.
        name: case name used in error messages.

    Returns:
        ``(B,)`` float tensor of PSNR in dB.
    """
    if data_range <= 0:
        raise ValueError(f"data_range={data_range}; expected a positive number")
    pred, ref = _pair(pred, ref, spatial_dims, name)
    return PSNRMetric(max_val=data_range, reduction="none")(pred, ref).reshape(-1)


def _ssim(pred: torch.Tensor, ref: torch.Tensor, spatial_dims: int, data_range: float, win_size: int, sigma: float,
          name: str) -> torch.Tensor:
    """``monai.metrics.SSIMMetric`` over ``spatial_dims`` dimensions, one value per batch item."""
    pred, ref = _pair(pred, ref, spatial_dims, name)
    _check_window_fits(pred.shape[2:], win_size, name)
    metric = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, win_size=win_size, kernel_sigma=sigma,
                        reduction="none")
    return metric(pred, ref).reshape(-1)


def ssim_3d(
    pred: torch.Tensor,
    ref: torch.Tensor,
    data_range: float = UNIT_DATA_RANGE,
    win_size: int = SSIM_WIN_SIZE,
    sigma: float = SSIM_SIGMA,
    name: str = "volume",
) -> torch.Tensor:
    """3D SSIM (``monai.metrics.SSIMMetric``, ``spatial_dims=3``), one value per batch item.

    A 3D Gaussian window of ``win_size`` samples per axis and standard deviation ``sigma`` slides over
    the volume without padding (valid positions only); the SSIM map is averaged. K1 = 0.01, K2 = 0.03.

    Args:
        pred: ``(B, C, D, H, W)`` or ``(C, D, H, W)``; every spatial size >= ``win_size``.
        ref: same shape as ``pred``.
        data_range: 2 for the unit scale [-1, 1].
        win_size: Gaussian window size per axis.
        sigma: Gaussian standard deviation in voxels.
        name: case name used in error messages.

    Returns:
        ``(B,)`` float tensor, 1 for identical volumes.
    """
    return _ssim(pred, ref, 3, data_range, win_size, sigma, name)


def ssim_2d(
    pred: torch.Tensor,
    ref: torch.Tensor,
    data_range: float = XRAY_DATA_RANGE,
    win_size: int = SSIM_WIN_SIZE,
    sigma: float = SSIM_SIGMA,
    name: str = "image",
) -> torch.Tensor:
    """2D SSIM (``monai.metrics.SSIMMetric``, ``spatial_dims=2``), one value per batch item.

    Args:
        pred: ``(B, C, H, W)`` or ``(C, H, W)``; H and W >= ``win_size``.
        ref: same shape as ``pred``.
        data_range: 1 for X-rays in [0, 1], 2 for unit-scale CT slices.
        win_size: Gaussian window size per axis (valid positions only).
        sigma: Gaussian standard deviation in pixels.
        name: case name used in error messages.

    Returns:
        ``(B,)`` float tensor, 1 for identical images.
    """
    return _ssim(pred, ref, 2, data_range, win_size, sigma, name)


def _axial_slices(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B * D, C, H, W)``: axial slices as a batch of 2D images."""
    return rearrange(x, "b c d h w -> (b d) c h w")


def slice_psnr(pred: torch.Tensor, ref: torch.Tensor, data_range: float = UNIT_DATA_RANGE, name: str = "volume") -> torch.Tensor:
    """X2CT-compatible PSNR: 2D PSNR of every axial slice, averaged over the slices of each volume.

    Not the same number as :func:`psnr` (the mean of logs is >= the log of the mean MSE); report it
    under its own label. A slice identical in both volumes has PSNR ``+inf``, so the average is ``+inf``.

    Args:
        pred: ``(B, C, D, H, W)`` or ``(C, D, H, W)``; axial slices are ``[..., d, :, :]``.
        ref: same shape as ``pred``.
        data_range: 2 for the unit scale [-1, 1].
        name: case name used in error messages.

    Returns:
        ``(B,)`` float tensor in dB.
    """
    pred, ref = _pair(pred, ref, 3, name)
    per_slice = PSNRMetric(max_val=data_range, reduction="none")(_axial_slices(pred), _axial_slices(ref))
    return rearrange(per_slice.reshape(-1), "(b d) -> b d", b=pred.shape[0]).mean(dim=1)


def slice_ssim(
    pred: torch.Tensor,
    ref: torch.Tensor,
    data_range: float = UNIT_DATA_RANGE,
    win_size: int = SSIM_WIN_SIZE,
    sigma: float = SSIM_SIGMA,
    name: str = "volume",
) -> torch.Tensor:
    """X2CT-compatible SSIM: 2D SSIM of every axial slice, averaged over the slices of each volume.

    Same window as :func:`ssim_3d` but two-dimensional (``win_size`` x ``win_size`` Gaussian, ``sigma``).

    Args:
        pred: ``(B, C, D, H, W)`` or ``(C, D, H, W)``; H and W >= ``win_size``.
        ref: same shape as ``pred``.
        data_range: 2 for the unit scale [-1, 1].
        win_size: Gaussian window size per axis.
        sigma: Gaussian standard deviation in pixels.
        name: case name used in error messages.

    Returns:
        ``(B,)`` float tensor.
    """
    pred, ref = _pair(pred, ref, 3, name)
    _check_window_fits(pred.shape[3:], win_size, name)
    metric = SSIMMetric(spatial_dims=2, data_range=data_range, win_size=win_size, kernel_sigma=sigma, reduction="none")
    per_slice = metric(_axial_slices(pred), _axial_slices(ref))
    return rearrange(per_slice.reshape(-1), "(b d) -> b d", b=pred.shape[0]).mean(dim=1)


def mae_hu(pred: torch.Tensor, ref: torch.Tensor, window: HUWindow, name: str = "volume") -> torch.Tensor:
    """Mean absolute error in Hounsfield units (``monai.metrics.MAEMetric``), one value per batch item.

    Both volumes are mapped to HU with ``window.to_hu`` (values outside [-1, 1] are clamped, exactly as
    when a volume is saved as HU), so the error is measured within the window: at most its width.

    Args:
        pred: ``(B, C, D, H, W)`` or ``(C, D, H, W)`` in [-1, 1].
        ref: same shape as ``pred``.
        window: the HU window of the [-1, 1] mapping (``dataset.intensity.HUWindow``).
        name: case name used in error messages.

    Returns:
        ``(B,)`` float tensor in HU.
    """
    pred, ref = _pair(pred, ref, 3, name)
    return MAEMetric(reduction="none")(window.to_hu(pred), window.to_hu(ref)).reshape(-1)


def volume_metrics(
    pred: torch.Tensor,
    ref: torch.Tensor,
    window: HUWindow,
    win_size: int = SSIM_WIN_SIZE,
    name: str = "volume",
) -> dict[str, float]:
    """All voxel-wise metrics of one generated volume against its reference.

    Both volumes are clamped to [-1, 1] first (the HU window; what saving as HU does), so in-memory
    results equal those of the saved NIfTI files.

    Args:
        pred: one volume ``(1, D, H, W)`` (or ``(1, 1, D, H, W)``) in [-1, 1].
        ref: same shape as ``pred``.
        window: HU window of the [-1, 1] mapping.
        win_size: SSIM Gaussian window size (sigma 1.5) for the 3D and the slice-wise SSIM.
        name: case name used in error messages.

    Returns:
        ``psnr_db`` (whole volume, data range 2 = window width in HU), ``ssim_3d``, ``mae_hu``, and the
        X2CT-compatible ``x2ct_slice_psnr_db`` and ``x2ct_slice_ssim`` (axial slice averages).
    """
    pred, ref = _pair(pred, ref, 3, name)
    if pred.shape[0] != 1:
        raise ValueError(f"{name}: volume_metrics takes one volume, got a batch of {pred.shape[0]}")
    pred, ref = pred.clamp(-1.0, 1.0), ref.clamp(-1.0, 1.0)
    return {
        "psnr_db": float(psnr(pred, ref, UNIT_DATA_RANGE, name=name)),
        "ssim_3d": float(ssim_3d(pred, ref, UNIT_DATA_RANGE, win_size=win_size, name=name)),
        "mae_hu": float(mae_hu(pred, ref, window, name=name)),
        "x2ct_slice_psnr_db": float(slice_psnr(pred, ref, UNIT_DATA_RANGE, name=name)),
        "x2ct_slice_ssim": float(slice_ssim(pred, ref, UNIT_DATA_RANGE, win_size=win_size, name=name)),
    }


def anatomy_masks(volume: torch.Tensor, window: HUWindow) -> dict[str, torch.Tensor]:
    """Body, lung and bone masks of one CT from the HU thresholds :data:`BODY_HU`, :data:`LUNG_HU`, :data:`BONE_HU`.

    - body: voxels above ``BODY_HU``, largest 3D connected component (drops the table and stray voxels),
      then holes filled slice by slice in the axial plane (the lungs and airways enclosed by the chest wall
      belong to the body; slice-wise because the trachea opens the lungs to the outside in 3D);
    - lung: voxels of the filled body below ``LUNG_HU`` (lungs and airways; gas in the bowel too);
    - bone: voxels of the filled body at or above ``BONE_HU``.

    Args:
        volume: ``(1, D, H, W)`` (or ``(1, 1, D, H, W)``) in [-1, 1] (HU via ``window``, clamped to it).
        window: HU window of the [-1, 1] scale; it must contain the thresholds.

    Returns:
        ``{"body", "lung", "bone"}``: bool ``(D, H, W)`` tensors.
    """
    from scipy import ndimage

    for name, hu in (("body/lung", BODY_HU), ("bone", BONE_HU)):
        if not window.hu_min < hu < window.hu_max:
            raise ValueError(f"the {name} threshold {hu:g} HU lies outside the HU window "
                             f"[{window.hu_min:g}, {window.hu_max:g}]; anatomy metrics need a window containing it")
    if volume.shape[0] != 1 or volume.ndim not in (4, 5) or (volume.ndim == 5 and volume.shape[1] != 1):
        raise ValueError(f"volume has shape {tuple(volume.shape)}; expected one CT (1, D, H, W)")
    hu = window.to_hu(volume.detach().float().clamp(-1, 1)).reshape(volume.shape[-3:]).cpu().numpy()
    tissue = hu > BODY_HU
    labels, n = ndimage.label(tissue)
    if n == 0:
        body = tissue
    else:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        body = labels == int(sizes.argmax())
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])  # axial slices: (H, W) each
    return {"body": torch.from_numpy(body), "lung": torch.from_numpy(body & (hu < LUNG_HU)),
            "bone": torch.from_numpy(body & (hu >= BONE_HU))}


def anatomy_dice(pred: torch.Tensor, ref: torch.Tensor, window: HUWindow, name: str = "volume") -> dict[str, float]:
    """Lung and bone Dice of a generated CT against its reference (masks by :func:`anatomy_masks` on both).

    Dice ``2 |P & R| / (|P| + |R|)`` (``monai.metrics.DiceMetric``); 1 when both masks are empty, 0 when
    only one is.

    Args:
        pred: one volume ``(1, D, H, W)`` in [-1, 1].
        ref: same shape.
        window: HU window of the [-1, 1] scale.
        name: case name used in error messages.

    Returns:
        ``{"lung_dice", "bone_dice"}`` as floats in [0, 1].
    """
    pred, ref = _pair(pred, ref, 3, name)
    if pred.shape[0] != 1:
        raise ValueError(f"{name}: anatomy_dice takes one volume, got a batch of {pred.shape[0]}")
    mp, mr = anatomy_masks(pred[0], window), anatomy_masks(ref[0], window)
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return {f"{k}_dice": float(dice(mp[k][None, None].float(), mr[k][None, None].float()).reshape(()))
            for k in ("lung", "bone")}


def _as_image(x: torch.Tensor, name: str) -> torch.Tensor:
    """An X-ray / DRR as ``(1, 1, H, W)`` float: accepts ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)``."""
    if x.ndim < 2 or x.ndim > 4 or any(s != 1 for s in x.shape[:-2]):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected one image (H, W), (1, H, W) or (1, 1, H, W)")
    return x.reshape(1, 1, *x.shape[-2:]).float()


def reprojection_metrics(
    volume: torch.Tensor,
    ap: torch.Tensor,
    lat: torch.Tensor,
    render: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    win_size: int = SSIM_WIN_SIZE,
    name: str = "volume",
) -> dict[str, float]:
    """DRR re-projection consistency of a generated CT with the X-rays it was generated from.

    The generated volume is rendered with the input's DRR geometry (``render``) and each rendered view is
    compared with the input X-ray: PSNR with data range 1 and 2D SSIM (Gaussian window ``win_size``,
    sigma 1.5) on the [0, 1] images. A volume compared with its own DRRs gives ``+inf`` PSNR and SSIM 1.

    Args:
        volume: one generated volume ``(1, D, H, W)`` in [-1, 1].
        ap: input AP X-ray, ``(1, 1, H, W)``, ``(1, H, W)`` or ``(H, W)`` in [0, 1].
        lat: input lateral X-ray, same layouts, in [0, 1].
        render: maps ``volume`` to ``(ap, lat)`` DRRs in [0, 1] shaped like the inputs, e.g.
            ``lambda v: dataset.drr.render_drr_pair(v, spacing, geometry, window)``.
        win_size: SSIM window size.
        name: case name used in error messages.

    Returns:
        ``{"drr_ap_psnr_db", "drr_ap_ssim", "drr_lat_psnr_db", "drr_lat_ssim"}`` as floats.
    """
    check_finite(volume, f"{name} volume")
    with torch.no_grad():
        drr_ap, drr_lat = render(volume)
    out: dict[str, float] = {}
    for view, x_in, x_drr in (("ap", ap, drr_ap), ("lat", lat, drr_lat)):
        x_in = _as_image(x_in, f"{name} input {view.upper()} X-ray")
        x_drr = _as_image(x_drr.detach().cpu(), f"{name} rendered {view.upper()} DRR")
        label = f"{name} {view.upper()} re-projection"
        if x_in.shape != x_drr.shape:
            raise ValueError(
                f"{label}: input X-ray shape {tuple(x_in.shape[-2:])} differs from the rendered DRR shape "
                f"{tuple(x_drr.shape[-2:])}; render with the geometry the X-rays were made with"
            )
        out[f"drr_{view}_psnr_db"] = float(psnr(x_drr, x_in, XRAY_DATA_RANGE, spatial_dims=2, name=label))
        out[f"drr_{view}_ssim"] = float(ssim_2d(x_drr, x_in, XRAY_DATA_RANGE, win_size=win_size, name=label))
    return out


def drr_consistency(metrics: Mapping[str, float]) -> float | None:
    """The DRR consistency of one number: the mean of ``drr_ap_psnr_db`` and ``drr_lat_psnr_db`` (dB).

    ``metrics`` holds :func:`reprojection_metrics`' keys (for one case, or their means over cases); None when it
    has no re-projection PSNRs.
    """
    if "drr_ap_psnr_db" not in metrics or "drr_lat_psnr_db" not in metrics:
        return None
    return (metrics["drr_ap_psnr_db"] + metrics["drr_lat_psnr_db"]) / 2


def extract_features(
    volumes: torch.Tensor | Sequence[torch.Tensor],
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 1,
    zscore: bool = True,
) -> torch.Tensor:
    """Feature vectors of volumes from a pretrained 3D network (MedicalNet ResNet-10 in the CLI).

    MedicalNet was trained on intensity-normalised volumes, so by default each volume is z-scored
    (zero mean, unit standard deviation over its voxels) before it is fed to ``extractor``. Feature maps
    ``(N, F, d, h, w)`` are global-average-pooled to ``(N, F)``.

    Args:
        volumes: ``(N, 1, D, H, W)`` tensor or a sequence of ``(1, D, H, W)`` volumes in [-1, 1].
        extractor: callable (an ``nn.Module`` in eval mode) from ``(n, 1, D, H, W)`` to ``(n, F)`` or
            ``(n, F, *spatial)``, or a list of such maps (multi-scale, e.g. ``AutoEncoder.medicalnet``'s
            ``MedicalNetFeatures``), of which the last (deepest) is used. Run on the device of its
            parameters if it has any.
        batch_size: volumes per forward pass.
        zscore: normalise each volume before the extractor.

    Returns:
        ``(N, F)`` float64 feature tensor on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    items = list(volumes)  # a (N, 1, D, H, W) tensor iterates as N volumes
    if not items:
        raise ValueError("extract_features got no volumes")
    device = torch.device("cpu")
    if isinstance(extractor, torch.nn.Module):
        param = next(extractor.parameters(), None)
        if param is not None:
            device = param.device
    feats = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = torch.stack([_as_batch(v, 3, "feature volume")[0] for v in items[start : start + batch_size]])
            check_finite(batch, f"feature volumes {start}..{start + len(batch) - 1}")
            if zscore:
                mean = batch.mean(dim=(1, 2, 3, 4), keepdim=True)
                std = batch.std(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
                batch = (batch - mean) / std
            f = extractor(batch.to(device))
            if isinstance(f, (list, tuple)):  # multi-scale extractors: use the deepest stage
                f = f[-1]
            if f.ndim > 2:
                f = f.flatten(start_dim=2).mean(dim=2)  # (n, F, *spatial) -> (n, F)
            feats.append(f.detach().double().cpu())
    return torch.cat(feats)


def fid_min_samples(n_features: int) -> int:
    """Default minimum number of samples per set for :func:`fid`: ``n_features + 1``.

    With fewer samples the sample covariance of ``n_features``-dimensional features is rank-deficient and
    FID is dominated by that estimation error (512 MedicalNet features -> 513 volumes per set).
    """
    return n_features + 1


def _check_feature_sets(pred_feats: torch.Tensor, ref_feats: torch.Tensor) -> None:
    for label, f in (("generated", pred_feats), ("reference", ref_feats)):
        if f.ndim != 2:
            raise ValueError(f"{label} features have shape {tuple(f.shape)}; expected (N, F)")
        check_finite(f, f"{label} features")
    if pred_feats.shape[1] != ref_feats.shape[1]:
        raise ValueError(
            f"feature sizes differ: generated {pred_feats.shape[1]}, reference {ref_feats.shape[1]}"
        )


def fid(pred_feats: torch.Tensor, ref_feats: torch.Tensor, min_samples: int | None = None) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (``monai.metrics.FIDMetric``).

    ``FID = |mu_p - mu_r|^2 + tr(S_p + S_r - 2 (S_p S_r)^(1/2))`` with sample means and covariances.

    Args:
        pred_feats: ``(N_p, F)`` features of generated volumes (see :func:`extract_features`).
        ref_feats: ``(N_r, F)`` features of reference volumes.
        min_samples: minimum rows per set; default :func:`fid_min_samples` (``F + 1``). Lower it only
            knowingly: below ``F + 1`` the number is biased upward and comparable only at equal N. Never
            below 2 (a covariance needs two samples).

    Returns:
        FID as a float (>= 0 up to rounding; ~0 for identical sets).

    Raises:
        ValueError: a set has fewer than ``min_samples`` rows, or shapes / values are invalid.
    """
    _check_feature_sets(pred_feats, ref_feats)
    needed = fid_min_samples(pred_feats.shape[1]) if min_samples is None else int(min_samples)
    if needed < 2:
        raise ValueError(f"min_samples={min_samples}; FID needs at least 2 samples per set")
    for label, f in (("generated", pred_feats), ("reference", ref_feats)):
        if f.shape[0] < needed:
            raise ValueError(
                f"FID needs at least {needed} {label} samples for {pred_feats.shape[1]} features, got {f.shape[0]}"
            )
    value = FIDMetric()(pred_feats.double(), ref_feats.double())
    return float(value)


def mmd(pred_feats: torch.Tensor, ref_feats: torch.Tensor) -> float:
    """Unbiased maximum mean discrepancy with a linear kernel (``monai.metrics.MMDMetric``) on features.

    With a linear kernel, MMD^2 estimates ``|E f_p - E f_r|^2``; it is ~0 for sets from one distribution
    and may be slightly negative (unbiased estimator).

    Args:
        pred_feats: ``(N, F)`` features of generated volumes.
        ref_feats: ``(N, F)`` features of reference volumes; MONAI requires the same N (paired sets).

    Returns:
        MMD^2 as a float.
    """
    _check_feature_sets(pred_feats, ref_feats)
    if pred_feats.shape[0] != ref_feats.shape[0] or pred_feats.shape[0] < 2:
        raise ValueError(
            f"MMD needs two equally sized sets of >= 2 samples; got {pred_feats.shape[0]} generated "
            f"and {ref_feats.shape[0]} reference"
        )
    return float(MMDMetric()(ref_feats.double(), pred_feats.double()))
