"""Projection-consistency guidance: lowers the DRR loss, weight 0 changes nothing, bad settings refused."""

from __future__ import annotations

import math

import pytest
import torch

from AutoEncoder import PatchVolumeAutoencoder
from dataset import DRRGeometry, HUWindow, render_drr_pair
from ddpm import BiFlowNet, Diffusion, LoadedBiFlowNet, parallel_projection_grids
from evaluation import generate_ct
from evaluation.generation import CTGenerator
from evaluation.projection_guidance import GuidanceSettings, ProjectionGuidance, projection_loss

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, SPACING = 16, (16.0, 16.0, 16.0)
LATENT = [4, 4, 4]
WINDOW = HUWindow()
GEOMETRY = DRRGeometry.fit((SIZE,) * 3, SPACING, SIZE)
NETWORK = {"in_channels": 4, "latent_shape": LATENT, "model_channels": 8, "channel_mults": [1, 2],
           "attn_levels": [], "norm_groups": 4, "sub_volume": 2, "token_patch": 1, "dit_heads": 2,
           "mlp_ratio": 2.0, "num_mid_dit": 1, "num_classes": 0,
           "xray": {"image_size": [SIZE, SIZE], "patch_size": 4, "dim": 16, "depth": 1, "num_heads": 2},
           "cross_attention": "footprint", "back_projection": False}


def tiny_generator(process: str = "ddpm", codes: int = 0) -> CTGenerator:
    """Random-weight 4x autoencoder (16^3 <-> 4^3 x 4; VQ with ``codes`` > 0, else continuous) and X-ray
    BiFlowNet; the training geometry rides on the autoencoder's dataset description."""
    torch.manual_seed(0)
    ae = PatchVolumeAutoencoder(1, [8, 8, 8], 4, n_codes=codes, num_res_blocks=1, attention_heads=0, num_groups=4,
                                patch_size=16).eval().requires_grad_(False)
    if codes:
        with torch.no_grad():  # a codebook spread like the latents it will see
            ae.quantizer.embedding.copy_(torch.randn(codes, 4))
    ae.dataset_info = {"geometry": GEOMETRY.to_dict()}
    model = BiFlowNet(**NETWORK).eval().requires_grad_(False)
    model.set_projection_grids(*parallel_projection_grids(tuple(LATENT)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights: the zero-initialised conditioning paths become active
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    diffusion = Diffusion(process, "v", num_train_timesteps=100, sampler="rflow" if process == "rflow" else "ddim")
    loaded = LoadedBiFlowNet(model, diffusion, torch.zeros(1, 4, 1, 1, 1), torch.ones(1, 4, 1, 1, 1),
                             {"num_classes": 0, "latent_channels": 4, "latent_shape": LATENT,
                              "xray_size": [SIZE, SIZE]})
    return CTGenerator(loaded, ae, WINDOW, SPACING, torch.device("cpu"))


@pytest.fixture(scope="module")
def generator() -> CTGenerator:
    return tiny_generator()


@pytest.fixture(scope="module")
def xrays(generator: CTGenerator) -> tuple[torch.Tensor, torch.Tensor]:
    """DRRs of a CT the (continuous) decoder can produce, so a perfect match exists."""
    z = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ct = generator.decode(z, quantize=False).clamp(-1, 1)
    return render_drr_pair(ct[0], SPACING, GEOMETRY, WINDOW)


def drr_loss(volumes: torch.Tensor, ap: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """(K,) projection loss with the evaluation's renderer (Siddon)."""
    k = volumes.shape[0]
    return projection_loss(volumes, ap[None].expand(k, -1, -1, -1), lat[None].expand(k, -1, -1, -1), SPACING,
                           GEOMETRY, WINDOW, renderer="siddon")


def draw(gen: CTGenerator, ap, lat, sampler: str = "ddim", k: int = 1, cfg: float = 1.0, steps: int = 3,
         **kwargs) -> torch.Tensor:
    return gen.sample(ap, lat, None, k, sampler, steps, cfg, torch.Generator().manual_seed(5), **kwargs)


def test_weight_zero_gives_exactly_the_unguided_result(xrays) -> None:
    generator = tiny_generator(codes=64)
    ap, lat = xrays
    plain = draw(generator, ap, lat, k=2)
    torch.testing.assert_close(draw(generator, ap, lat, k=2, projection_guidance=0.0), plain, rtol=0, atol=0)
    off = GuidanceSettings(weight=0.0, steps=3, start=0.0, renderer="siddon")
    torch.testing.assert_close(draw(generator, ap, lat, k=2, projection_guidance=off), plain, rtol=0, atol=0)


@pytest.mark.parametrize("process,sampler,k,cfg,codes", [("ddpm", "ddim", 1, 1.0, 0), ("ddpm", "ddim", 2, 2.0, 0),
                                                         ("ddpm", "ddpm", 2, 1.0, 0), ("rflow", "rflow", 1, 1.5, 0),
                                                         ("ddpm", "ddim", 2, 1.0, 64)])
def test_guidance_lowers_the_projection_loss(process: str, sampler: str, k: int, cfg: float, codes: int,
                                             xrays) -> None:
    """Same seed, same network: every guided sample re-projects closer to its X-rays than its unguided twin
    (continuous and VQ autoencoders, K samples, classifier-free guidance, every sampler)."""
    gen = tiny_generator(process, codes)
    ap, lat = xrays
    plain = drr_loss(draw(gen, ap, lat, sampler, k, cfg), ap, lat)
    settings = GuidanceSettings(weight=0.5, steps=3, start=0.0)
    guided = drr_loss(draw(gen, ap, lat, sampler, k, cfg, projection_guidance=settings), ap, lat)
    assert guided.shape == plain.shape == (k,)
    assert bool((guided < 0.9 * plain).all()), (plain, guided)


def test_each_guided_step_lowers_the_loss_of_the_estimate_it_corrects(generator: CTGenerator, xrays) -> None:
    """The Polyak step removes about the fraction w of the loss (first order) on the decoded estimate itself."""
    ap, lat = xrays
    settings = GuidanceSettings(weight=0.3, steps=1, start=0.0, quantize=False)
    hook = ProjectionGuidance(lambda z: generator.decode(z, quantize=False), ap, lat, SPACING, GEOMETRY, WINDOW,
                              settings, num_inference_steps=1)
    x0 = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = hook.loss(generator.decode(x0, quantize=False))
        after = hook.loss(generator.decode(hook(0, torch.zeros(2), x0), quantize=False))
    assert hook(1, torch.zeros(2), x0) is None  # not a guided step
    torch.testing.assert_close(hook.history[0][1], before)
    ratio = after / before
    assert bool((ratio < 0.85).all() and (ratio > 0.5).all()), ratio  # about 1 - 0.3


def test_refinement_lowers_the_loss_and_its_prior_keeps_the_volume_close(generator: CTGenerator, xrays) -> None:
    ap, lat = xrays
    vol = generator.decode(torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(4))).clamp(-1, 1)
    changes, losses = [], []
    for prior in (0.0, 100.0):
        settings = GuidanceSettings(weight=0.0, refine_steps=5, refine_prior=prior, refine_lr=0.02)
        hook = ProjectionGuidance(generator.decode, ap, lat, SPACING, GEOMETRY, WINDOW, settings, 3)
        out = hook.refine(vol)
        assert out.shape == vol.shape and float(out.abs().max()) <= 1.0
        changes.append(float((out - vol).abs().mean()))
        losses.append(float(drr_loss(out, ap, lat)))
    assert losses[0] < 0.8 * float(drr_loss(vol, ap, lat))
    assert changes[1] < changes[0]


def test_guided_steps_are_spread_over_the_end_of_the_trajectory() -> None:
    assert GuidanceSettings(weight=0.5, steps=4, start=0.5).step_indices(25) == {12, 16, 20, 24}
    assert GuidanceSettings(weight=0.5, steps=1, start=0.0).step_indices(25) == {24}
    assert GuidanceSettings(weight=0.5, steps=9, start=0.8).step_indices(5) == {4}
    assert GuidanceSettings(weight=0.5, steps=3, start=0.0).step_indices(3) == {0, 1, 2}
    assert GuidanceSettings(weight=0.0, steps=3).step_indices(10) == set()


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, 1.5])
def test_bad_weights_are_refused_by_sample(generator: CTGenerator, xrays, value: float) -> None:
    ap, lat = xrays
    with pytest.raises(ValueError, match="projection_guidance=") as info:
        draw(generator, ap, lat, projection_guidance=value)
    assert "\n" not in str(info.value)


def test_bad_settings_are_refused() -> None:
    for kwargs, name in (({"steps": 0}, "steps"), ({"start": -0.5}, "guidance_start"),
                         ({"refine_steps": -1}, "refine_steps"), ({"refine_prior": math.nan}, "refine_prior"),
                         ({"renderer": "nearest"}, "renderer")):
        with pytest.raises(ValueError, match=name):
            GuidanceSettings(weight=0.5, **kwargs)


def test_guidance_needs_xrays_and_a_geometry(generator: CTGenerator, xrays) -> None:
    ap, lat = xrays
    with pytest.raises(ValueError, match="needs an AP and a LAT"):
        generator.sample(None, None, None, 1, "ddim", 2, projection_guidance=0.5)
    bare = tiny_generator()
    bare.autoencoder.dataset_info = {}
    with pytest.raises(ValueError, match="DRR geometry"):
        draw(bare, ap, lat, projection_guidance=0.5)
    small = DRRGeometry.fit((SIZE,) * 3, SPACING, 8)
    with pytest.raises(ValueError, match="geometry expects"):
        draw(bare, ap, lat, projection_guidance=0.5, geometry=small)


@pytest.mark.parametrize("option,value", [("--projection-guidance", "-1"), ("--projection-guidance", "nan"),
                                          ("--projection-guidance", "2"), ("--guidance-steps", "0"),
                                          ("--guidance-start", "nan"), ("--refine-steps", "-2")])
def test_cli_refuses_bad_guidance_options_in_one_line(option: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        generate_ct.build_parser().parse_args(["--checkpoint", "x.ckpt", option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err, err
