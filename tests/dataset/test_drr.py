import pytest
import torch
import torch.nn.functional as F

from dataset import DRRGeometry, HUWindow, ViewGeometry, render_drr_pair
from dataset.drr import project_points

SHAPE, SPACING = (24, 20, 28), (6.0, 7.0, 5.0)


def _blob_volume(centre: tuple[int, int, int], sigma_mm: float = 6.0) -> torch.Tensor:
    """Air with one Gaussian bright blob (a unique, smooth peak) around voxel ``centre``."""
    axes = [(torch.arange(n) - c) * s for n, c, s in zip(SHAPE, centre, SPACING)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return (2 * torch.exp(-(z**2 + y**2 + x**2) / (2 * sigma_mm**2)) - 1)[None]


def _pixel(grid_xy: torch.Tensor, rows: int, cols: int) -> tuple[float, float]:
    """grid_sample (x, y) with align_corners=False -> (row, col) pixel coordinates."""
    return float(((grid_xy[1] + 1) * rows - 1) / 2), float(((grid_xy[0] + 1) * cols - 1) / 2)


@pytest.mark.parametrize("centre", [(5, 5, 6), (18, 14, 21), (12, 4, 20), (7, 15, 4)])
@pytest.mark.parametrize("view", ["AP", "LAT"])
def test_blob_peak_lands_where_sample_grid_says(centre: tuple[int, int, int], view: str) -> None:
    geometry = DRRGeometry.fit(SHAPE, SPACING, detector_size=(40, 48), sdd=900.0, sid=400.0)
    ap, lat = render_drr_pair(_blob_volume(centre), SPACING, geometry)
    image = (ap if view == "AP" else lat)[0]
    row, col = _pixel(geometry.sample_grid(view, SHAPE, SPACING)[centre], *geometry.detector_size)
    peak = divmod(int(image.argmax()), image.shape[1])
    assert abs(peak[0] - row) <= 1.0 and abs(peak[1] - col) <= 1.0, (peak, row, col)
    # ... and the blob's intensity centroid within half a pixel
    weights = image / image.sum()
    c_row = (weights.sum(1) * torch.arange(image.shape[0])).sum()
    c_col = (weights.sum(0) * torch.arange(image.shape[1])).sum()
    assert abs(c_row - row) < 0.5 and abs(c_col - col) < 0.5, (c_row, c_col, row, col)


def test_orientation_matches_radiograph_convention() -> None:
    geometry = DRRGeometry.fit(SHAPE, SPACING, detector_size=32)
    # superior (small D), anterior (small H), patient-left (large W) blob
    ap, lat = render_drr_pair(_blob_volume((4, 4, 23)), SPACING, geometry)
    r_ap, c_ap = divmod(int(ap[0].argmax()), 32)
    r_lat, c_lat = divmod(int(lat[0].argmax()), 32)
    assert r_ap < 16 and r_lat < 16  # superior at the top of both views
    assert c_ap >= 16  # AP columns run patient right -> left: patient left is on the viewer's right
    assert c_lat < 16  # LAT columns run anterior -> posterior: anterior on the left


def test_sample_grid_back_projection_and_fit() -> None:
    geometry = DRRGeometry.fit(SHAPE, SPACING, detector_size=32)
    for view in ("AP", "LAT"):
        grid = geometry.sample_grid(view, SHAPE, SPACING)
        assert grid.shape == (*SHAPE, 2) and grid.dtype == torch.float32
        assert grid.abs().max() < 1.0  # fit(): every voxel projects onto the detector
        # back-projecting a constant image gives that constant on every voxel
        ones = torch.ones(1, 3, 32, 32)
        vox = F.grid_sample(ones, grid.flatten(1, 2)[None], align_corners=False)
        assert torch.allclose(vox, torch.ones_like(vox))


def test_values_batching_and_air() -> None:
    geometry = DRRGeometry.fit((16, 16, 16), (10.0, 10.0, 10.0), detector_size=16)
    vols = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    ap, lat = render_drr_pair(vols, (10.0, 10.0, 10.0), geometry)
    assert ap.shape == lat.shape == (3, 1, 16, 16)
    assert ap.min() >= 0 and ap.max() <= 1 and lat.max() > 0
    ap1, lat1 = render_drr_pair(vols[1], (10.0, 10.0, 10.0), geometry)
    assert torch.allclose(ap1, ap[1], atol=1e-6) and torch.allclose(lat1, lat[1], atol=1e-6)
    # chunking is a memory knob only
    ap2, _ = render_drr_pair(vols[1], (10.0, 10.0, 10.0), geometry, max_elements=500)
    assert torch.allclose(ap2, ap1, atol=1e-6)
    air, _ = render_drr_pair(torch.full((1, 16, 16, 16), -1.0), (10.0, 10.0, 10.0), geometry, HUWindow())
    assert air.abs().max() == 0


def test_water_path_length_is_physical() -> None:
    # a 20 cm water slab (0 HU) seen head-on at the detector centre gives 1 - exp(-200 / wet_scale)
    vol = torch.full((1, 20, 20, 20), -1.0)
    vol[:, :, 5:15, :] = 0.0  # 0 HU <-> 0.0 in the default window; H extent 10 voxels * 20 mm = 200 mm
    geometry = DRRGeometry.uniform(sdd=20000.0, sid=10000.0, detector_size=(4, 4), pixel_spacing=1.0)
    ap, _ = render_drr_pair(vol, (20.0, 20.0, 20.0), geometry)
    expected = 1 - torch.exp(torch.tensor(-200.0 / geometry.wet_scale_mm))
    assert torch.allclose(ap, expected.expand_as(ap), atol=1e-4)


def test_geometry_dict_round_trip_and_bad_values() -> None:
    g = DRRGeometry.fit(SHAPE, SPACING, 64)
    assert DRRGeometry.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="sdd"):
        DRRGeometry.uniform(sdd=500, sid=600)
    with pytest.raises(ValueError, match="view"):
        g.sample_grid("PA", SHAPE, SPACING)
    with pytest.raises(ValueError, match="expected \\(1, D, H, W\\)"):
        render_drr_pair(torch.zeros(2, 8, 8, 8), SPACING, g)
    with pytest.raises(ValueError, match="sid"):
        DRRGeometry.fit((100, 100, 100), (10.0, 10.0, 10.0), sid=300.0)
    incomplete = {k: v for k, v in g.to_dict().items() if k != "pixel_spacing"}
    with pytest.raises(ValueError, match=r"lacks \['pixel_spacing'\]"):
        DRRGeometry.from_dict(incomplete)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    geometry = DRRGeometry.fit(SHAPE, SPACING, detector_size=32)
    vol = _blob_volume((10, 8, 12))
    ap, lat = render_drr_pair(vol, SPACING, geometry)
    ap_gpu, lat_gpu = render_drr_pair(vol.cuda(), SPACING, geometry)
    assert ap_gpu.is_cuda
    assert torch.allclose(ap_gpu.cpu(), ap, atol=1e-5) and torch.allclose(lat_gpu.cpu(), lat, atol=1e-5)


def _varied_geometries() -> list[DRRGeometry]:
    base = DRRGeometry.fit(SHAPE, SPACING, detector_size=(40, 48), sdd=900.0, sid=400.0)
    pitch = base.ap.pixel_spacing[0]
    return [
        base.replace_view("AP", angle=4.0).replace_view("LAT", angle=-3.0),
        base.replace_view("AP", offset=(6.0, -9.0)).replace_view("LAT", offset=(-5.0, 7.0)),
        base.replace_view("AP", reversed=True).replace_view("LAT", reversed=True),
        DRRGeometry(ViewGeometry(1200.0, 500.0, (36, 52), (pitch * 1.1, pitch * 0.9)),
                    ViewGeometry(800.0, 450.0, (40, 44), pitch * 1.2, angle=2.0), 300.0),
    ]


@pytest.mark.parametrize("geometry", _varied_geometries())
@pytest.mark.parametrize("centre", [(5, 5, 6), (18, 14, 21), (7, 15, 4)])
def test_blob_peak_follows_offsets_angles_and_reversed_sources(geometry: DRRGeometry, centre) -> None:
    ap, lat = render_drr_pair(_blob_volume(centre), SPACING, geometry)
    for view, image in (("AP", ap[0]), ("LAT", lat[0])):
        rows, cols = geometry.view(view).detector_size
        assert image.shape == (rows, cols)
        row, col = _pixel(geometry.sample_grid(view, SHAPE, SPACING)[centre], rows, cols)
        weights = image / image.sum()
        c_row = (weights.sum(1) * torch.arange(rows)).sum()
        c_col = (weights.sum(0) * torch.arange(cols)).sum()
        assert abs(c_row - row) < 0.5 and abs(c_col - col) < 0.5, (view, c_row, c_col, row, col)


def test_geometry_parameters_move_the_projection_the_right_way() -> None:
    base = DRRGeometry.uniform(1000.0, 600.0, (64, 64), 1.0)
    point = torch.tensor([[10.0, 40.0, -30.0]], dtype=torch.float64)  # inferior, posterior, patient right
    ap0 = project_points(point, "AP", base.ap.to_tensor())[0]
    # 10 mm inferior, magnified by sdd / (sid + 40) -> rows below the centre
    assert ap0[1] == pytest.approx(2 * 10 * 1000 / 640 / 64)
    assert ap0[0] == pytest.approx(2 * -30 * 1000 / 640 / 64)
    # PA: the posterior point is now nearer the source side's far end -> larger magnification
    pa = project_points(point, "AP", base.replace_view("AP", reversed=True).ap.to_tensor())[0]
    assert pa[1] == pytest.approx(2 * 10 * 1000 / 560 / 64)
    # a detector offset shifts the image the other way on the detector
    off = project_points(point, "AP", base.replace_view("AP", offset=(4.0, 0.0)).ap.to_tensor())[0]
    assert off[1] == pytest.approx(ap0[1] - 2 * 4.0 / 64)
    # a rotation about the long axis turns depth into lateral displacement
    rot = project_points(point, "AP", base.replace_view("AP", angle=10.0).ap.to_tensor())[0]
    a = torch.deg2rad(torch.tensor(10.0, dtype=torch.float64))
    depth, lateral = 40 * torch.cos(a) - 30 * torch.sin(a), -40 * torch.sin(a) - 30 * torch.cos(a)
    assert rot[0] == pytest.approx(float(2 * lateral * 1000 / (600 + depth) / 64))


def test_per_view_geometry_round_trips_and_bad_values() -> None:
    for g in _varied_geometries():
        assert DRRGeometry.from_dict(g.to_dict()) == g
        assert DRRGeometry.from_tensor(g.to_tensor(), g.wet_scale_mm) == g
        assert DRRGeometry.from_columns(g.to_columns(), DRRGeometry()) == DRRGeometry(g.ap, g.lat)
        assert "views" in g.to_dict()
    uniform = DRRGeometry.uniform(1200, 800, 96, 1.5)
    assert set(uniform.to_dict()) == {"sdd", "sid", "detector_size", "pixel_spacing", "wet_scale_mm"}
    assert uniform.sdd == 1200 and uniform.pixel_spacing == (1.5, 1.5)
    mixed = uniform.replace_view("LAT", sdd=1300.0)
    with pytest.raises(ValueError, match="differ in sdd"):
        _ = mixed.sdd
    assert DRRGeometry.from_columns({"lat_angle": "2.5", "ap_sdd": ""}, uniform).lat.angle == 2.5
    for kwargs, match in [({"pixel_spacing": 0.0}, "pixel_spacing"), ({"pixel_spacing": float("nan")}, "pixel_spacing"),
                          ({"sdd": float("nan")}, "sdd"), ({"sid": 2000.0}, "sdd=1500.0 must exceed"),
                          ({"angle": 60.0}, "angle"), ({"angle": float("inf")}, "angle"),
                          ({"offset": (float("nan"), 0.0)}, "offset"), ({"detector_size": (1, 8)}, "detector_size")]:
        with pytest.raises(ValueError, match=match):
            ViewGeometry(**kwargs)
    with pytest.raises(ValueError, match="not a number"):
        DRRGeometry.from_columns({"ap_sdd": "far"}, uniform)
    with pytest.raises(ValueError, match="wet_scale_mm"):
        DRRGeometry(wet_scale_mm=-1.0)
