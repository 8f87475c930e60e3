"""Per-sample projection geometry in BiFlowNet: grids, footprints, caching, mixed batches, bad geometries."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from dataset import HUWindow, render_drr_pair
from dataset.drr import DRRGeometry
from ddpm import BiFlowNet, BiFlowNetModule, xray_conditioner
from tests.ddpm.conftest import randomize, tiny_network
from tests.ddpm.test_module import DIFFUSION, _Latents

SPACING = (20.0, 18.0, 22.0)  # latent voxel spacing (mm) of the tiny 8^3 latent
DEFAULT = DRRGeometry.uniform(1500, 1000, 16, 20.0)
OTHERS = [
    DEFAULT.replace_view("LAT", angle=3.0, offset=(10.0, -25.0)),
    DRRGeometry.uniform(1200, 800, 16, 16.0).replace_view("AP", angle=-2.0, reversed=True),
    DRRGeometry.uniform(1800, 950, 16, 24.0).replace_view("AP", offset=(-15.0, 30.0)),
]


def _net(**overrides) -> BiFlowNet:
    net = BiFlowNet(**tiny_network(**{"cross_attention": "footprint", "back_projection": True, **overrides}))
    net.set_geometry(DEFAULT, SPACING)
    return net


def _pack(*geometries: DRRGeometry, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.stack([g.to_tensor(dtype) for g in geometries])


@pytest.mark.parametrize("geometry", OTHERS, ids=["tilted-offset-lat", "pa-1200", "offset-ap-1800"])
def test_per_sample_grids_equal_the_fixed_grids_of_that_geometry(geometry: DRRGeometry) -> None:
    net, ref = _net(), _net()
    ref.set_geometry(geometry, SPACING)  # that geometry as the default: the fixed-buffer path
    grid_ap, grid_lat, mask = net.xray.projection(_pack(geometry, geometry), 2)
    assert grid_ap.shape == (2, 8, 8, 8, 2) and mask.shape == (2, 8 * 8, 32)
    fixed_ap, fixed_lat, fixed_mask = ref.xray.projection(None, 2)
    for b in range(2):
        torch.testing.assert_close(grid_ap[b], fixed_ap, rtol=0, atol=1e-6)
        torch.testing.assert_close(grid_lat[b], fixed_lat, rtol=0, atol=1e-6)
        assert torch.equal(mask[b], fixed_mask)
    # and both are what DRRGeometry.sample_grid gives for the latent voxel centres
    torch.testing.assert_close(fixed_ap, geometry.sample_grid("AP", (8, 8, 8), SPACING), rtol=0, atol=1e-6)
    torch.testing.assert_close(fixed_lat, geometry.sample_grid("LAT", (8, 8, 8), SPACING), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_geometry_takes_the_fixed_buffer_path(dtype: torch.dtype, inputs: dict) -> None:
    net = randomize(_net()).eval()
    grid_ap, _, mask = net.xray.projection(_pack(DEFAULT, DEFAULT, dtype=dtype), 2)
    assert grid_ap.data_ptr() == net.xray.grid_ap.data_ptr() and mask.ndim == 2  # the buffers themselves
    assert len(net.xray._cache) == 0
    with torch.no_grad():
        torch.testing.assert_close(net(**inputs, geometry=_pack(DEFAULT, DEFAULT, dtype=dtype)), net(**inputs),
                                   rtol=0, atol=0)


def _centroid(image: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted (row, col) of a (rows, cols) image."""
    rows, cols = torch.meshgrid(torch.arange(image.shape[0]), torch.arange(image.shape[1]), indexing="ij")
    w = image / image.sum()
    return float((w * rows).sum()), float((w * cols).sum())


@pytest.mark.parametrize("geometry", [DEFAULT, *OTHERS], ids=["default", "tilted-offset-lat", "pa-1200", "offset-ap-1800"])
def test_marker_voxel_projects_to_its_pixel_in_the_drr(geometry: DRRGeometry) -> None:
    net = _net()
    voxel = (2, 5, 6)  # off-centre along every axis, so a flipped or swapped axis moves it
    grid_ap, grid_lat, _ = net.xray.projection(_pack(geometry), 1)
    volume = -torch.ones(1, 8, 8, 8)
    volume[0, voxel[0], voxel[1], voxel[2]] = 1.0  # one dense voxel in air
    fine = geometry  # the same detectors in 4x finer pixels, so the voxel spans several of them
    for v in ("AP", "LAT"):
        pitch = fine.view(v).pixel_spacing
        fine = fine.replace_view(v, detector_size=(64, 64), pixel_spacing=(pitch[0] / 4, pitch[1] / 4))
    drrs = render_drr_pair(volume, SPACING, fine, HUWindow())
    for view, grid, drr in (("AP", grid_ap, drrs[0]), ("LAT", grid_lat, drrs[1])):
        x, y = (grid if grid.ndim == 4 else grid[0])[voxel].tolist()  # the default geometry: shared buffers
        expected = ((y + 1) / 2 * 64 - 0.5, (x + 1) / 2 * 64 - 0.5)  # (row, col) pixel centre coordinates
        got = _centroid(drr[0])
        assert abs(got[0] - expected[0]) < 0.5 and abs(got[1] - expected[1]) < 0.5, (view, got, expected)


def test_mixed_geometry_batch_matches_batch_of_one_runs() -> None:
    net = randomize(_net()).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, 8, generator=g)
    ap, lat = torch.rand(3, 1, 16, 16, generator=g), torch.rand(3, 1, 16, 16, generator=g)
    t, y = torch.tensor([10, 400, 900]), torch.tensor([0, 1, 1])
    geometry = _pack(DEFAULT, OTHERS[0], OTHERS[1])
    with torch.no_grad():
        out = net(x, t, y, ap, lat, geometry=geometry)
        for i in range(3):
            one = net(x[i:i + 1], t[i:i + 1], y[i:i + 1], ap[i:i + 1], lat[i:i + 1], geometry=geometry[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], one, rtol=1e-5, atol=1e-6)
        default = net(x, t, y, ap, lat)
    torch.testing.assert_close(out[0], default[0], rtol=1e-5, atol=1e-6)  # the default sample is unchanged
    for i in (1, 2):  # the others see their own footprints and rays
        assert (out[i] - default[i]).abs().max() > 1e-4


def test_cache_is_bounded_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xray_conditioner, "GEOMETRY_CACHE_SIZE", 2)
    net = _net()
    first = net.xray.projection(_pack(OTHERS[0]), 1)[0]
    again = net.xray.projection(_pack(OTHERS[0]), 1)[0]
    assert torch.equal(first, again) and len(net.xray._cache) == 1
    net.xray.projection(_pack(OTHERS[1], OTHERS[2]), 2)
    assert len(net.xray._cache) == 2  # OTHERS[0] was the least recently used
    keys = [k[-1] for k in net.xray._cache]
    assert keys == [OTHERS[1].to_tensor().numpy().tobytes(), OTHERS[2].to_tensor().numpy().tobytes()]


def test_geometry_and_spacing_survive_state_dict_and_dtype_casts() -> None:
    net = _net()
    geometry = OTHERS[0]
    net.set_geometry(geometry, SPACING)
    other = BiFlowNet(**tiny_network(cross_attention="footprint", back_projection=True))
    assert other.geometry is None and other.xray.latent_spacing is None
    other.load_state_dict(net.state_dict())
    assert other.geometry == geometry and other.xray.latent_spacing == SPACING
    torch.testing.assert_close(other.xray.grid_lat, geometry.sample_grid("LAT", (8, 8, 8), SPACING), rtol=0, atol=1e-6)
    # a bf16 cast rounds every float buffer; the stored geometry must stay exact (1500 mm is 1504 in bf16)
    assert other.to(torch.bfloat16).geometry == geometry


def test_per_sample_geometry_needs_the_latent_spacing() -> None:
    net = BiFlowNet(**tiny_network(cross_attention="footprint"))  # parallel-beam grids, no spacing
    with pytest.raises(ValueError, match="latent voxel spacing"):
        net.xray.projection(_pack(DEFAULT), 1)
    with pytest.raises(ValueError, match="no X-ray conditioning"):
        BiFlowNet(**tiny_network(xray=None, cross_attention="none")).set_geometry(DEFAULT, SPACING)
    with pytest.raises(ValueError, match="detector"):
        net.set_geometry(DRRGeometry.uniform(1500, 1000, 32, 10.0), SPACING)  # 32 px detector, 16 px X-rays


def _bad(**changes) -> torch.Tensor:
    t = DEFAULT.to_tensor(torch.float32)
    names = ("sdd", "sid", "rows", "cols", "pitch_row", "pitch_col", "offset_row", "offset_col", "angle", "reversed")
    for k, v in changes.items():
        t[1, names.index(k)] = v
    return torch.stack([DEFAULT.to_tensor(torch.float32), t])


@pytest.mark.parametrize(
    "geometry,match",
    [
        (_bad(sdd=900.0), r"sample 1 \(LAT\).*sdd=900.0 must exceed sid=1000.0"),
        (_bad(pitch_row=0.0), r"sample 1 \(LAT\).*pixel_spacing"),
        (_bad(pitch_col=float("nan")), r"sample 1 \(LAT\) has a non-finite pitch_col"),
        (_bad(angle=50.0), r"sample 1 \(LAT\).*angle=50.0 is invalid"),
        (_bad(sid=float("inf")), r"sample 1 \(LAT\) has a non-finite sid"),
        (_bad(rows=32.0), r"sample 1 \(LAT\).*\(32, 16\) detector.*\(16, 16\) X-rays"),
        (_bad(rows=15.5), r"rows/cols must be integers"),
        (_bad(reversed=0.5), r"reversed 0 or 1"),
        (DEFAULT.to_tensor()[None], r"geometry has shape \(1, 2, 10\), expected \(2, 2, 10\)"),
        (DEFAULT.to_tensor()[None].expand(2, -1, -1)[..., :9], r"expected \(2, 2, 10\)"),
    ],
    ids=["sdd<=sid", "zero-pitch", "nan-pitch", "angle-50", "inf-sid", "detector-size", "fractional-rows",
         "reversed-half", "batch-size", "params-9"],
)
@pytest.mark.parametrize("mode", [{"cross_attention": "footprint"}, {"cross_attention": "full", "back_projection": False}])
def test_bad_geometry_is_refused_in_one_line(geometry: torch.Tensor, match: str, mode: dict, inputs: dict) -> None:
    net = _net(**mode)
    with pytest.raises(ValueError, match=match) as err:
        net(**inputs, geometry=geometry)
    assert "\n" not in str(err.value)


def test_module_trains_and_validates_with_per_sample_geometry(tmp_path: Path) -> None:
    from dataset import DatasetInfo

    # a 32^3 CT at (5, 4.5, 5.5) mm: the 8^3 latent has the SPACING used above
    DatasetInfo(window=HUWindow(), spacing=(5.0, 4.5, 5.5), shape=(32, 32, 32), geometry=DEFAULT).save(
        tmp_path / "dataset.json")
    module = BiFlowNetModule(network=tiny_network(cross_attention="footprint", back_projection=True),
                             diffusion=DIFFUSION, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                             val_timesteps=[10], val_sample_steps=2, dataset_json=str(tmp_path / "dataset.json"))
    geometries = [DEFAULT, *OTHERS]

    class Items(_Latents):
        def __getitem__(self, i: int) -> dict:
            return {**super().__getitem__(i), "geometry": geometries[i].to_tensor(torch.float32)}

    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, DataLoader(Items(4), batch_size=2), DataLoader(Items(4), batch_size=2))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val/loss"])
    for net in (module.model, module.ema_model):
        assert net.geometry == DEFAULT and net.xray.latent_spacing == pytest.approx(SPACING)
    # the three non-default geometries went through the per-sample path (the validation batch: the EMA copy's)
    assert len(module.model.xray._cache) == 3 and len(module.ema_model.xray._cache) == 1


def test_back_projection_projects_on_the_detector_first_with_the_same_result_and_gradients() -> None:
    """``bp_proj`` applied to the detector maps before spreading them along the rays (cone beam, two
    geometries in a batch) equals the 1x1x1 convolution of the spread features, values and gradients."""
    from ddpm.projection import back_project

    net = randomize(_net()).double()
    xray = net.xray
    ap = torch.rand(2, 1, *xray.encoder.image_size, dtype=torch.float64)
    lat = torch.rand_like(ap)
    grid_ap, grid_lat, _ = xray.projection(_pack(DEFAULT, OTHERS[0], dtype=torch.float64), 2)
    tokens = xray.encoder(ap, lat)[0].detach().requires_grad_()
    ap_map, lat_map = xray.encoder.token_maps(tokens)
    reference = xray.bp_proj(torch.cat([back_project(ap_map, grid_ap), back_project(lat_map, grid_lat)], dim=1))
    result = xray._back_projected(tokens, grid_ap, grid_lat)
    assert result.shape == (2, xray.bp_proj.out_channels, *xray.latent_shape)
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(result)
    got = torch.autograd.grad(result, [tokens, xray.bp_proj.weight, xray.bp_proj.bias], grad)
    want = torch.autograd.grad(reference, [tokens, xray.bp_proj.weight, xray.bp_proj.bias], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
