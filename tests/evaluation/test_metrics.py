"""Metric functions against hand-computed values."""

import math

import pytest
import torch

from dataset.intensity import HUWindow
from evaluation import metrics


def _ramp(shape=(1, 1, 16, 16, 16)) -> torch.Tensor:
    """A deterministic volume in [-0.8, 0.8] with structure along every axis."""
    d, h, w = shape[-3:]
    zz, yy, xx = torch.meshgrid(torch.linspace(0, 1, d), torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    vol = 0.8 * torch.sin(3 * zz + 5 * yy * xx) * torch.cos(4 * xx - 2 * yy)
    return vol.expand(shape).clone()


@pytest.mark.parametrize("offset", [0.5, 0.1, -0.02])
@pytest.mark.parametrize("data_range", [2.0, 1.0])
def test_psnr_constant_offset(offset: float, data_range: float) -> None:
    ref = _ramp()
    pred = ref + offset
    expected = 20 * math.log10(data_range / abs(offset))
    assert metrics.psnr(pred, ref, data_range).item() == pytest.approx(expected, abs=1e-3)


def test_psnr_identical_is_inf_per_item() -> None:
    ref = _ramp((2, 1, 8, 8, 8))
    pred = ref.clone()
    pred[1] += 0.1
    out = metrics.psnr(pred, ref)
    assert out.shape == (2,)
    assert math.isinf(out[0].item()) and out[0] > 0
    assert out[1].item() == pytest.approx(20 * math.log10(2 / 0.1), abs=1e-3)


def test_psnr_single_volume_and_2d_images() -> None:
    ref = _ramp()[0]  # (C, D, H, W)
    assert metrics.psnr(ref + 0.2, ref).shape == (1,)
    img = torch.rand(3, 1, 12, 12)
    out = metrics.psnr(img + 0.1, img, data_range=1.0, spatial_dims=2)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), 20.0), atol=1e-3)


def test_psnr_unit_scale_equals_psnr_in_hu_with_window_range() -> None:
    hu_min, hu_max = -1000.0, 1000.0
    ref = _ramp()
    pred = ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    to_hu = lambda x: (x + 1) / 2 * (hu_max - hu_min) + hu_min
    unit = metrics.psnr(pred, ref, data_range=2.0)
    hu = metrics.psnr(to_hu(pred), to_hu(ref), data_range=hu_max - hu_min)
    assert unit.item() == pytest.approx(hu.item(), abs=1e-3)


def test_ssim_identical_is_one_and_lower_with_noise() -> None:
    ref = _ramp()
    assert metrics.ssim_3d(ref, ref).item() == pytest.approx(1.0, abs=1e-5)
    noisy = ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    value = metrics.ssim_3d(noisy, ref).item()
    assert 0.0 < value < 0.9


def test_ssim_window_larger_than_volume_raises() -> None:
    ref = _ramp((1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        metrics.ssim_3d(ref, ref)
    assert metrics.ssim_3d(ref, ref, win_size=7).item() == pytest.approx(1.0, abs=1e-5)


def test_slice_averaged_differs_from_whole_volume() -> None:
    # Two axial slices with different constant errors a and b: whole-volume PSNR uses the pooled MSE,
    # the X2CT-style number averages per-slice PSNRs.
    ref = torch.zeros(1, 1, 2, 8, 8)
    a, b = 0.4, 0.01
    pred = ref.clone()
    pred[:, :, 0] += a
    pred[:, :, 1] -= b
    whole = 10 * math.log10(2.0**2 / ((a**2 + b**2) / 2))
    sliced = (20 * math.log10(2.0 / a) + 20 * math.log10(2.0 / b)) / 2
    assert metrics.psnr(pred, ref).item() == pytest.approx(whole, abs=1e-3)
    assert metrics.slice_psnr(pred, ref).item() == pytest.approx(sliced, abs=1e-3)
    assert sliced - whole > 10  # far apart: the two modes must never be mixed


def test_slice_ssim_identical_and_differs_from_3d() -> None:
    ref = _ramp()
    assert metrics.slice_ssim(ref, ref).item() == pytest.approx(1.0, abs=1e-5)
    noisy = ref + 0.2 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    s2 = metrics.slice_ssim(noisy, ref).item()
    s3 = metrics.ssim_3d(noisy, ref).item()
    assert s2 < 1 and s3 < 1 and abs(s2 - s3) > 1e-3


@pytest.mark.parametrize("fn", [metrics.psnr, metrics.ssim_3d, metrics.slice_psnr, metrics.slice_ssim])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises_naming_case(fn, bad: float) -> None:
    ref = _ramp()
    pred = ref.clone()
    pred[0, 0, 3, 4, 5] = bad
    with pytest.raises(ValueError, match="case_007 prediction contains non-finite"):
        fn(pred, ref, name="case_007")


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="differs from reference shape"):
        metrics.psnr(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))


def test_fid_identical_sets_is_zero() -> None:
    feats = torch.randn(64, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert metrics.fid(feats, feats.clone()) == pytest.approx(0.0, abs=1e-6)


def test_fid_shifted_gaussians_matches_closed_form() -> None:
    # N(0, I) vs N(m, 4 I) in F dims: FID = |m|^2 + tr(I + 4I - 2 (4I)^(1/2)) = |m|^2 + F.
    g = torch.Generator().manual_seed(4)
    n, f = 20000, 4
    m = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    a = torch.randn(n, f, generator=g, dtype=torch.float64)
    b = m + 2.0 * torch.randn(n, f, generator=g, dtype=torch.float64)
    expected = float(m.dot(m)) + f
    assert metrics.fid(a, b) == pytest.approx(expected, rel=0.03)


def test_fid_below_minimum_samples_raises() -> None:
    feats = torch.randn(8, 16, dtype=torch.float64)
    assert metrics.fid_min_samples(16) == 17
    with pytest.raises(ValueError, match="at least 17 generated samples for 16 features, got 8"):
        metrics.fid(feats, feats)
    assert metrics.fid(feats, feats, min_samples=4) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.fid(feats, feats, min_samples=1)


def _unbiased_linear_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Hand-written unbiased MMD^2 with k(u, v) = u.v, using sum_{i!=j} x_i.x_j = |sum x|^2 - sum |x_i|^2."""
    m, n = len(x), len(y)
    xx = (x.sum(0).dot(x.sum(0)) - (x * x).sum()) / (m * (m - 1))
    yy = (y.sum(0).dot(y.sum(0)) - (y * y).sum()) / (n * (n - 1))
    xy = x.sum(0).dot(y.sum(0)) / (m * n)
    return float(xx + yy - 2 * xy)


def test_mmd_linear_kernel() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    shift = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    assert metrics.mmd(a, b) == pytest.approx(0.0, abs=0.01)
    assert metrics.mmd(a + shift, b) == pytest.approx(_unbiased_linear_mmd(a + shift, b), rel=1e-9)
    assert metrics.mmd(a + shift, b) == pytest.approx(float(shift.dot(shift)), abs=0.25)  # population value
    with pytest.raises(ValueError, match="equally sized"):
        metrics.mmd(a[:10], b[:11])


def test_extract_features_pools_and_zscores() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 5, 3), torch.nn.ReLU())
    vols = _ramp((3, 1, 8, 8, 8)) * torch.tensor([1.0, 0.5, 0.25]).view(3, 1, 1, 1, 1)
    feats = metrics.extract_features(vols, net, batch_size=2)
    assert feats.shape == (3, 5) and feats.dtype == torch.float64
    # z-scoring removes the per-volume scale, so all three volumes give the same features
    assert torch.allclose(feats[0], feats[2], atol=1e-4)
    raw = metrics.extract_features(list(vols), net, zscore=False)
    assert not torch.allclose(raw[0], raw[2], atol=1e-4)


def test_extract_features_uses_deepest_of_multiscale_outputs() -> None:
    conv_a, conv_b = torch.nn.Conv3d(1, 3, 3), torch.nn.Conv3d(1, 7, 3)
    feats = metrics.extract_features(_ramp((2, 1, 8, 8, 8)), lambda x: [conv_a(x), conv_b(x)])
    assert feats.shape == (2, 7)


@pytest.mark.parametrize(("hu_min", "hu_max"), [(-1000.0, 1000.0), (-1024.0, 3071.0)])
def test_mae_hu_known_offset(hu_min: float, hu_max: float) -> None:
    window = HUWindow(hu_min, hu_max)
    ref = _ramp()
    pred = ref + 0.1  # stays inside [-1, 1]: an offset of 0.1 * width / 2 HU everywhere
    assert metrics.mae_hu(pred, ref, window).item() == pytest.approx(0.05 * (hu_max - hu_min), rel=1e-4)
    assert metrics.mae_hu(ref, ref, window).item() == 0.0


def test_volume_metrics_keys_and_identity() -> None:
    window = HUWindow()
    ref = _ramp((1, 16, 16, 16))
    same = metrics.volume_metrics(ref, ref.clone(), window)
    assert set(same) == {"psnr_db", "ssim_3d", "mae_hu", "x2ct_slice_psnr_db", "x2ct_slice_ssim"}
    assert math.isinf(same["psnr_db"]) and math.isinf(same["x2ct_slice_psnr_db"])
    assert same["ssim_3d"] == pytest.approx(1.0, abs=1e-5) and same["mae_hu"] == 0.0
    off = metrics.volume_metrics(ref + 0.1, ref, window)
    assert off["psnr_db"] == pytest.approx(20 * math.log10(2 / 0.1), abs=1e-3)
    assert off["mae_hu"] == pytest.approx(100.0, rel=1e-4)
    # out-of-range predictions are clamped to the window, as when saved as HU
    clamped = metrics.volume_metrics(ref * 0 + 1.5, ref * 0 + 0.5, window, win_size=7)
    assert clamped["mae_hu"] == pytest.approx(500.0, rel=1e-5)


def test_reprojection_of_own_drrs_is_perfect_and_drops_when_perturbed() -> None:
    from dataset import DRRGeometry, chest_phantom, image_to_volume, render_drr_pair

    window = HUWindow()
    hu, spacing = image_to_volume(chest_phantom((24, 24, 24), (10.0, 10.0, 10.0), seed=1))
    vol = window.to_unit(hu)  # (1, D, H, W)
    geometry = DRRGeometry.fit((24, 24, 24), spacing, detector_size=24)
    render = lambda v: render_drr_pair(v, spacing, geometry, window)
    ap, lat = render(vol)
    own = metrics.reprojection_metrics(vol, ap, lat, render)
    assert set(own) == {"drr_ap_psnr_db", "drr_ap_ssim", "drr_lat_psnr_db", "drr_lat_ssim"}
    assert own["drr_ap_psnr_db"] > 60 and own["drr_lat_psnr_db"] > 60  # inf when rendering is exact
    assert own["drr_ap_ssim"] == pytest.approx(1.0, abs=1e-4)
    # a denser left half changes both projections
    perturbed = vol.clone()
    perturbed[..., 12:] = (perturbed[..., 12:] + 0.3).clamp(-1, 1)
    other = metrics.reprojection_metrics(perturbed, ap, lat, render)
    for view in ("ap", "lat"):
        assert other[f"drr_{view}_psnr_db"] < 40
        assert other[f"drr_{view}_psnr_db"] < own[f"drr_{view}_psnr_db"] - 20
        assert other[f"drr_{view}_ssim"] < own[f"drr_{view}_ssim"]
    with pytest.raises(ValueError, match="differs from the rendered DRR shape"):
        metrics.reprojection_metrics(vol, ap[..., :20], lat, render, name="case_x")


WINDOW = HUWindow()


def _torso(lung_w: int = 8, bone: bool = True, trachea: bool = False, table: bool = False) -> torch.Tensor:
    """A 32^3 (1, D, H, W) [-1, 1] volume: water body [8, 28) x [6, 26) x [4, 28) in air, an 8 x 8 x 4 lung
    of -800 HU at W in [lung_w, lung_w + 4), an optional 8 x 4 x 4 bone of 700 HU, an optional trachea (an
    air tube from the lung up through the body's top face) and an optional table (a separate water slab)."""
    hu = torch.full((32, 32, 32), -1000.0)
    hu[8:28, 6:26, 4:28] = 0.0
    hu[10:18, 10:18, lung_w:lung_w + 4] = -800.0
    if bone:
        hu[10:18, 20:24, 20:24] = 700.0
    if trachea:
        hu[8:10, 12:14, lung_w + 1:lung_w + 3] = -1000.0
    if table:
        hu[8:28, 28:30, 2:30] = 0.0
    return WINDOW.to_unit(hu)[None]


def test_anatomy_masks_follow_the_thresholds() -> None:
    masks = metrics.anatomy_masks(_torso(trachea=True, table=True), WINDOW)
    assert int(masks["body"].sum()) == 20 * 20 * 24  # the table is dropped, the enclosed lung is filled in
    assert int(masks["lung"].sum()) == 8 * 8 * 4 + 2 * 2 * 2  # lung + trachea (open to the air in 3D)
    assert int(masks["bone"].sum()) == 8 * 4 * 4
    assert not bool((masks["lung"] & masks["bone"]).any())


def test_anatomy_dice_known_by_construction() -> None:
    ref = _torso(lung_w=8)
    out = metrics.anatomy_dice(_torso(lung_w=9), ref, WINDOW)  # lung shifted by one voxel: 3 of 4 columns overlap
    assert out["lung_dice"] == pytest.approx(2 * 8 * 8 * 3 / (2 * 8 * 8 * 4))
    assert out["bone_dice"] == pytest.approx(1.0)
    assert metrics.anatomy_dice(ref, ref, WINDOW) == {"lung_dice": 1.0, "bone_dice": 1.0}
    no_bone = metrics.anatomy_dice(_torso(bone=False), ref, WINDOW)
    assert no_bone["bone_dice"] == 0.0 and no_bone["lung_dice"] == 1.0
    assert metrics.anatomy_dice(_torso(bone=False), _torso(bone=False), WINDOW)["bone_dice"] == 1.0  # both empty
    # air where the reference has a table: outside the body, so not lung
    assert metrics.anatomy_dice(ref, _torso(table=True), WINDOW)["lung_dice"] == 1.0


def test_anatomy_thresholds_outside_the_window_raise() -> None:
    with pytest.raises(ValueError, match="bone threshold 300 HU lies outside the HU window"):
        metrics.anatomy_masks(_torso(), HUWindow(-1000, 200))


def test_drr_consistency_is_the_mean_of_the_two_views_and_none_without_them() -> None:
    assert metrics.drr_consistency({"drr_ap_psnr_db": 30.0, "drr_lat_psnr_db": 36.0, "drr_ap_ssim": 0.9}) == 33.0
    assert metrics.drr_consistency({"drr_ap_psnr_db": 30.0}) is None
    assert metrics.drr_consistency({"psnr_db": 20.0}) is None
