"""evaluation.generation.CTGenerator on tiny checkpoints written here (no prepared dataset needed): loading and
its checks, X-ray checks at their boundaries, sampling options, guidance and the HU images it returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from AutoEncoder import PatchVolumeModule
from dataset import DatasetInfo, HUWindow
from ddpm import BiFlowNetModule
from evaluation.generation import CTGenerator, check_compatible, default_device
from tests.evaluation.test_generate_ct import AE_CONFIG, PROCESS, network, save_module

INFO = DatasetInfo(window=HUWindow(-800, 1200), spacing=(4.0, 3.0, 2.0), shape=(32, 32, 32), geometry=None)


def _biflownet(root: Path, name: str, net: dict, ae: Path | None, null_scale: float | None = None) -> Path:
    module = BiFlowNetModule(net, PROCESS, latent_stats={"mean": 0.5, "std": 2.0, "ae_checkpoint": str(ae) if ae else None})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights: the zero-initialised conditioning paths become active
        for p in module.ema_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        if null_scale is not None:  # an unconditional prediction far from the conditional one
            module.ema_model.xray_encoder.null_tokens.fill_(null_scale)
            module.ema_model.xray_encoder.null_pooled.fill_(null_scale)
    return save_module(module, root / f"{name}.ckpt")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("generation")
    ae = save_module(PatchVolumeModule(AE_CONFIG, loss={"perceptual_weight": 0.0}, dataset_info=INFO.to_dict()),
                     root / "ae.ckpt")
    return {
        "ae": ae,
        "bare_ae": save_module(PatchVolumeModule(AE_CONFIG, loss={"perceptual_weight": 0.0}), root / "bare_ae.ckpt"),
        "xray": _biflownet(root, "xray", network(), ae, null_scale=50.0),
        "class": _biflownet(root, "class", network(xray=None, cross_attention="none", back_projection=False,
                                                   num_classes=2), ae),
        "unrecorded": _biflownet(root, "unrecorded", network(), None),
    }


@pytest.fixture(scope="module")
def xray_gen(ckpts: dict[str, Path]) -> CTGenerator:
    return CTGenerator.from_checkpoints(ckpts["xray"], device="cpu")


@pytest.fixture(scope="module")
def class_gen(ckpts: dict[str, Path]) -> CTGenerator:
    return CTGenerator.from_checkpoints(ckpts["class"], device="cpu")


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 32, 32, generator=g), torch.rand(1, 32, 32, generator=g)


def _sample(gen: CTGenerator, seed: int = 0, **kw) -> torch.Tensor:
    kw.setdefault("num_inference_steps", 2)
    return gen.sample(generator=torch.Generator().manual_seed(seed), **kw)


def test_loading_takes_window_spacing_and_the_recorded_autoencoder(xray_gen: CTGenerator, ckpts) -> None:
    assert xray_gen.window == HUWindow(-800, 1200) and xray_gen.spacing == (4.0, 3.0, 2.0)
    assert xray_gen.device == torch.device("cpu") and not xray_gen.bf16
    assert xray_gen.needs_xrays and xray_gen.num_classes == 0
    assert xray_gen.autoencoder.latent_channels == 4
    torch.testing.assert_close(xray_gen.biflownet.latent_std.flatten(), torch.full((4,), 2.0))
    gen = CTGenerator.from_checkpoints(ckpts["class"], ckpts["ae"], device="cpu")  # an explicit autoencoder
    assert not gen.needs_xrays and gen.num_classes == 2


def test_default_device_is_cpu_without_cuda() -> None:
    assert default_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"checkpoint": "unrecorded"}, "records no autoencoder checkpoint; pass --autoencoder"),
        ({"checkpoint": "xray", "autoencoder": "bare_ae"}, "stores no dataset description"),
        ({"checkpoint": "xray", "bf16": True}, "bf16 sampling needs a CUDA device"),
    ],
)
def test_loading_refuses_what_cannot_generate(ckpts, kwargs: dict, match: str) -> None:
    args = {k: ckpts[v] if k in ("checkpoint", "autoencoder") else v for k, v in kwargs.items()}
    if torch.cuda.is_available() and "bf16" in kwargs:
        pytest.skip("bf16 is allowed with CUDA")
    with pytest.raises(ValueError, match=match):
        CTGenerator.from_checkpoints(device="cpu", **args)


def test_autoencoder_of_another_latent_space_is_named(xray_gen: CTGenerator, tmp_path: Path) -> None:
    other = PatchVolumeModule({**AE_CONFIG, "embedding_dim": 2}, loss={"perceptual_weight": 0.0}).autoencoder
    with pytest.raises(ValueError, match=r"ck\.pt expects 4 latent channels but autoencoder ae\.pt produces 2"):
        check_compatible(xray_gen.biflownet, other, "ck.pt", "ae.pt")
    check_compatible(xray_gen.biflownet, xray_gen.autoencoder, "ck.pt", "ae.pt")  # the matching one passes


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x: x[0], r"AP has shape \(32, 32\); expected \(1, H, W\)"),
        (lambda x: torch.cat([x, x]), r"AP has shape \(2, 32, 32\); expected \(1, H, W\)"),
        (lambda x: x[:, :16], r"AP is \(16, 32\) pixels; the model was trained on \(32, 32\)"),
        (lambda x: x.index_put((torch.tensor([0]), torch.tensor([3]), torch.tensor([4])), torch.tensor(float("nan"))),
         "AP has NaN or Inf pixels"),
        (lambda x: x.clamp(0, 1).index_fill(2, torch.tensor([5]), 1.01), r"AP values span \[.*, 1\.01\]"),
        (lambda x: x.clamp(0, 1).index_fill(2, torch.tensor([5]), -0.01), r"AP values span \[-0\.01, .*\]"),
    ],
)
def test_xrays_are_checked_at_the_boundaries(xray_gen: CTGenerator, change, match: str) -> None:
    ap, lat = _pair()
    with pytest.raises(ValueError, match=match):
        xray_gen.check_xrays(change(ap), lat)
    xray_gen.check_xrays(ap.index_fill(2, torch.tensor([5]), 1 + 5e-4), lat)  # within the rounding tolerance
    with pytest.raises(ValueError, match="LAT has shape"):
        xray_gen.check_xrays(ap, lat[0])


def test_sample_is_a_batch_of_volumes_in_range(xray_gen: CTGenerator) -> None:
    ap, lat = _pair()
    out = _sample(xray_gen, ap=ap, lat=lat, num_samples=3)
    assert out.shape == (3, 1, 32, 32, 32) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0
    assert not torch.allclose(out[0], out[1])  # independent noise per sample
    torch.testing.assert_close(_sample(xray_gen, ap=ap, lat=lat, num_samples=3), out, rtol=0, atol=0)
    # a smaller network batch draws the same noise in the same order
    torch.testing.assert_close(_sample(xray_gen, ap=ap, lat=lat, num_samples=3, batch_size=2), out, rtol=0, atol=1e-4)


def test_guidance_and_unconditional_sampling_change_the_volume(xray_gen: CTGenerator) -> None:
    ap, lat = _pair()
    plain = _sample(xray_gen, ap=ap, lat=lat)
    assert (_sample(xray_gen, ap=ap, lat=lat, guidance_scale=2.0) - plain).abs().max() > 0.05
    unconditional = _sample(xray_gen)  # no X-rays: the learned null condition
    assert (unconditional - plain).abs().max() > 0.05
    other = _sample(xray_gen, ap=_pair(1)[0], lat=_pair(1)[1])
    assert (other - plain).abs().max() > 0.0  # the X-rays condition the sample


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sampler": "euler"}, r"sampler='euler' is invalid"),
        ({"num_samples": 0}, "must be >= 1"),
        ({"num_inference_steps": 0}, "must be >= 1"),
        ({"guidance_scale": 2.0}, "needs X-rays to guide towards"),
        ({"ap": _pair()[0]}, "give both an AP and a LAT image"),
    ],
)
def test_bad_sampling_requests_are_refused(xray_gen: CTGenerator, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _sample(xray_gen, **kwargs)


def test_class_model_needs_a_valid_label_and_follows_it(class_gen: CTGenerator) -> None:
    for label in (None, -1, 2):
        with pytest.raises(ValueError, match=r"expected an integer in \[0, 2\)"):
            _sample(class_gen, label=label)
    zero, one = _sample(class_gen, label=0), _sample(class_gen, label=1)
    assert zero.shape == (1, 1, 32, 32, 32) and (zero - one).abs().max() > 0
    torch.testing.assert_close(_sample(class_gen, label=1), one, rtol=0, atol=0)


def test_hu_images_carry_window_and_spacing(xray_gen: CTGenerator) -> None:
    volumes = torch.stack([torch.full((1, 2, 3, 4), v) for v in (-1.0, 0.0, 1.0)])  # (K=3, 1, D, H, W)
    image = xray_gen.to_hu_image(volumes[1])
    assert image.spatial_shape == (4, 3, 2)  # LPI: (W, H, D)
    assert np.allclose(image.spacing, (2.0, 3.0, 4.0))
    assert torch.allclose(image.data, torch.full_like(image.data, 200.0))  # the middle of [-800, 1200]
    assert torch.allclose(xray_gen.to_hu_image(volumes[2]).data, torch.full_like(image.data, 1200.0))
    std = xray_gen.std_hu_image(volumes)
    assert np.allclose(std.spacing, (2.0, 3.0, 4.0))
    torch.testing.assert_close(std.data, torch.full_like(std.data, 1000.0))  # std of -800, 200, 1200 (unbiased)
    single = xray_gen.std_hu_image(volumes[:1])
    assert torch.count_nonzero(single.data) == 0  # one sample: zero spread, not NaN
