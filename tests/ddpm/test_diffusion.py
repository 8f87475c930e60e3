"""Diffusion process: noising, targets, x0 recovery, samplers, generators."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from ddpm import Diffusion

CONFIGS = [("ddpm", "eps", "ddim"), ("ddpm", "v", "ddim"), ("ddpm", "x0", "ddim"), ("ddpm", "eps", "ddpm"), ("rflow", "v", "rflow")]


@pytest.mark.parametrize("process,target,sampler", CONFIGS)
def test_add_noise_then_invert_with_true_noise_recovers_x0(process: str, target: str, sampler: str) -> None:
    diff = Diffusion(process, target, sampler=sampler)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, 4, generator=g), torch.randn(3, 2, 4, 4, 4, generator=g)
    t = torch.tensor([0, 421, 950])  # eps inversion is ill-conditioned at t -> T (alpha_bar -> 0)
    x_t = diff.add_noise(x0, noise, t)
    assert not torch.allclose(x_t[2], x0[2], atol=0.1)  # the last step is mostly noise
    torch.testing.assert_close(diff.predict_x0(x_t, t, diff.training_target(x0, noise, t)), x0, rtol=1e-4, atol=2e-4)


def test_gaussian_noising_matches_monai() -> None:
    diff = Diffusion("ddpm", "v", schedule="scaled_linear_beta")
    ref = DDPMScheduler(1000, schedule="scaled_linear_beta")
    x0, noise, t = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4), torch.tensor([5, 600])
    torch.testing.assert_close(diff.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    torch.testing.assert_close(diff.training_target(x0, noise, t), ref.get_velocity(x0, noise, t))


def _oracle(diff: Diffusion, x0: torch.Tensor):
    """The exact prediction for data made of the single point x0."""

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if diff.process == "rflow":
            s = (t.float() / diff.num_train_timesteps).reshape(-1, 1, 1, 1, 1).clamp_min(1e-6)
            noise = (x_t - (1 - s) * x0) / s
            return x0 - noise
        ab = diff.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
        noise = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return diff.training_target(x0, noise, t)

    return fn


@pytest.mark.parametrize("process,target,sampler", CONFIGS)
def test_sampler_with_exact_prediction_lands_on_x0(process: str, target: str, sampler: str) -> None:
    diff = Diffusion(process, target, sampler=sampler, num_inference_steps=10)
    x0 = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    out = diff.sample(_oracle(diff, x0), noise)
    torch.testing.assert_close(out, x0, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_sampling_is_deterministic_under_a_fixed_generator(sampler: str, eta: float) -> None:
    diff = Diffusion("ddpm", "eps", sampler=sampler, num_inference_steps=6, eta=eta)
    model = lambda x, t: 0.1 * x + 1e-4 * t.float().reshape(-1, 1, 1, 1, 1)  # noqa: E731

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return diff.sample(model, torch.randn(1, 2, 4, 4, 4, generator=g), g)

    torch.testing.assert_close(run(7), run(7), rtol=0, atol=0)
    assert not torch.allclose(run(7), run(8))


def test_training_loss_is_zero_for_the_exact_prediction() -> None:
    diff = Diffusion("ddpm", "v")
    x0 = torch.randn(2, 2, 4, 4, 4)
    loss = diff.training_loss(_oracle(diff, x0), x0, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    assert diff.training_loss(lambda x, t: torch.zeros_like(x), x0).item() > 0.1


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="target"):
        Diffusion("ddpm", "noise")
    with pytest.raises(ValueError, match="velocity"):
        Diffusion("rflow", "eps", sampler="rflow")
    with pytest.raises(ValueError, match="sampler"):
        Diffusion("ddpm", "eps", sampler="rflow")
    with pytest.raises(ValueError, match="process"):
        Diffusion("edm")


# Known answer: data x0 ~ N(MU, S^2) elementwise. Then x_t = a x0 + b noise is Gaussian too, and the exact
# (minimum-error) predictions are linear in x_t: with m = a MU and V = a^2 S^2 + b^2,
#   E[x0 | x_t] = MU + a S^2 / V (x_t - m),   E[noise | x_t] = b / V (x_t - m).
# DDPM: a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t); rectified flow: a = 1 - t/T, b = t/T.
# A correct sampler driven by them must return samples with mean MU and standard deviation S.
MU, S = 0.7, 0.4


def _gaussian_oracle(diff: Diffusion):
    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if diff.process == "rflow":
            s = (t.float() / diff.num_train_timesteps).reshape(-1, 1, 1, 1, 1)
            a, b = 1 - s, s
        else:
            ab = diff.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1, 1)
            a, b = ab.sqrt(), (1 - ab).sqrt()
        v = a**2 * S**2 + b**2
        x0 = MU + a * S**2 / v * (x_t - a * MU)
        noise = b / v * (x_t - a * MU)
        if diff.process == "rflow":
            return x0 - noise
        return {"eps": noise, "x0": x0, "v": a * noise - b * x0}[diff.target]

    return fn


@pytest.mark.parametrize(
    "process,target,sampler,eta,steps,tol",
    [
        # deterministic samplers: 100 steps bring the discretisation error well under 2 %
        ("ddpm", "eps", "ddim", 0.0, 100, 0.02),
        ("ddpm", "v", "ddim", 0.0, 100, 0.02),
        ("ddpm", "x0", "ddim", 0.0, 100, 0.02),
        ("rflow", "v", "rflow", 0.0, 100, 0.02),
        # stochastic ones slightly under-disperse with a point estimate of x0 (about 4 % at 100 steps)
        ("ddpm", "eps", "ddim", 0.6, 250, 0.03),
        ("ddpm", "v", "ddpm", 0.0, 250, 0.03),
        ("ddpm", "eps", "ddpm", 0.0, 250, 0.03),
    ],
)
def test_sampler_with_the_exact_denoiser_reproduces_a_gaussian(process, target, sampler, eta, steps, tol) -> None:
    diff = Diffusion(process, target, num_train_timesteps=1000, schedule="cosine", sampler=sampler, eta=eta)
    g = torch.Generator().manual_seed(0)
    out = diff.sample(_gaussian_oracle(diff), torch.randn(256, 1, 4, 4, 4, generator=g), g, num_inference_steps=steps)
    # 16384 values: the sampling error of the mean is ~0.003 and of the std ~0.5 %
    assert abs(out.mean().item() - MU) < 0.02, out.mean().item()
    assert abs(out.std().item() / S - 1) < tol, out.std().item()


def test_timesteps_are_uniform_integers_and_follow_the_generator() -> None:
    diff = Diffusion("ddpm", "eps", num_train_timesteps=10)
    t = diff.sample_timesteps(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (20000,) and int(t.min()) == 0 and int(t.max()) == 9
    counts = torch.bincount(t, minlength=10).float() / 20000
    assert (counts - 0.1).abs().max() < 4 * (0.1 * 0.9 / 20000) ** 0.5  # 4 binomial standard deviations
    again = diff.sample_timesteps(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_training_loss_is_reproducible_under_its_generator() -> None:
    diff = Diffusion("ddpm", "v")
    x0 = torch.randn(4, 2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    model = lambda x, t: 0.5 * x  # noqa: E731 - a fixed, imperfect predictor
    first = diff.training_loss(model, x0, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global RNG must not matter
    assert diff.training_loss(model, x0, generator=torch.Generator().manual_seed(0)).item() == first.item()
    assert diff.training_loss(model, x0, generator=torch.Generator().manual_seed(1)).item() != first.item()


def test_hparams_rebuild_the_same_process() -> None:
    kw = {"process": "ddpm", "target": "x0", "num_train_timesteps": 300, "schedule": "linear_beta",
          "sampler": "ddpm", "num_inference_steps": 7, "eta": 0.3, "loss_weighting": "min_snr", "min_snr_gamma": 2.5,
          "timestep_bias": 0.25}
    diff = Diffusion(**kw)
    assert diff.hparams() == kw
    rebuilt = Diffusion(**diff.hparams())
    torch.testing.assert_close(rebuilt.scheduler.alphas_cumprod, diff.scheduler.alphas_cumprod)
    assert (rebuilt.loss_weighting, rebuilt.min_snr_gamma) == ("min_snr", 2.5)
    # checkpoints written before the option existed rebuild with the uniform loss
    assert rebuilt.timestep_bias == 0.25
    old = {k: v for k, v in kw.items() if k not in ("loss_weighting", "min_snr_gamma", "timestep_bias")}
    assert Diffusion(**old).loss_weighting == "uniform" and Diffusion(**old).timestep_bias == 0.0


def _snr(diff: Diffusion, t: torch.Tensor) -> torch.Tensor:
    if diff.process == "rflow":
        s = t.double() / diff.num_train_timesteps
        return ((1 - s) / s) ** 2
    ab = diff.scheduler.alphas_cumprod[t].double()
    return ab / (1 - ab)


@pytest.mark.parametrize("process,target,sampler", CONFIGS)
def test_min_snr_loss_is_the_capped_snr_weighted_error_of_the_implied_clean_latent(process, target, sampler) -> None:
    gamma = 3.0
    diff = Diffusion(process, target, sampler=sampler, loss_weighting="min_snr", min_snr_gamma=gamma)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 4, 4, 4, generator=g)
    t = torch.tensor([1, 40, 250, 500, 800, 990])  # SNR from far above gamma to far below it
    snr = _snr(diff, t)
    assert snr.max() > 10 * gamma and snr.min() < gamma / 10
    model = lambda x, tt: 0.3 * x + 0.1  # noqa: E731 - an imperfect predictor
    loss = diff.training_loss(model, x0, t=t, generator=torch.Generator().manual_seed(1))
    # the same noise again: the implied clean latent's squared error, weighted by min(SNR, gamma), averaged
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = diff.add_noise(x0, noise, t)
    x0_err = (diff.predict_x0(x_t, t, model(x_t, t)) - x0).double().pow(2).flatten(1).mean(1)
    expected = (snr.clamp(max=gamma) * x0_err).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)
    # and it is not the uniform loss
    uniform = Diffusion(process, target, sampler=sampler).training_loss(model, x0, t=t,
                                                                      generator=torch.Generator().manual_seed(1))
    assert abs(uniform.item() - loss.item()) > 0.05 * uniform.item()


@pytest.mark.parametrize("process,target,sampler", CONFIGS)
def test_uniform_loss_weights_are_ones_and_the_loss_is_plain_mse(process, target, sampler) -> None:
    diff = Diffusion(process, target, sampler=sampler)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(diff.loss_weights(t), torch.ones(3))
    x0 = torch.randn(3, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    model = lambda x, tt: 0.5 * x  # noqa: E731
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x_t = diff.add_noise(x0, noise, t)
    expected = torch.nn.functional.mse_loss(model(x_t, t), diff.training_target(x0, noise, t))
    assert diff.training_loss(model, x0, t=t, generator=torch.Generator().manual_seed(2)).item() == expected.item()


@pytest.mark.parametrize("bad", [{"loss_weighting": "p2"}, {"min_snr_gamma": 0.0}, {"min_snr_gamma": -1.0},
                                 {"min_snr_gamma": float("nan")}, {"min_snr_gamma": float("inf")},
                                 {"min_snr_gamma": True}, {"min_snr_gamma": "5"}])
def test_bad_loss_weighting_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Diffusion("ddpm", "v", **bad)


@pytest.mark.parametrize("process,target,sampler", CONFIGS)
def test_implied_noise_inverts_add_noise(process: str, target: str, sampler: str) -> None:
    diff = Diffusion(process, target, sampler=sampler)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 2, 4, 4, 4, generator=g), torch.randn(3, 2, 4, 4, 4, generator=g)
    t = torch.tensor([10, 421, 950])
    torch.testing.assert_close(diff.implied_noise(diff.add_noise(x0, noise, t), t, x0), noise, rtol=1e-4, atol=1e-4)


def _sample_with_hook(diff: Diffusion, hook, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    model = lambda x, t: 0.3 * x + 1e-3 * t.float().reshape(-1, 1, 1, 1, 1)  # noqa: E731
    noise = torch.randn(2, 2, 4, 4, 4, generator=g)
    return diff.sample(model, noise, torch.Generator().manual_seed(seed), x0_hook=hook)


@pytest.mark.parametrize("process,target,sampler", CONFIGS)
def test_x0_hook_that_changes_nothing_leaves_the_sample_unchanged(process: str, target: str, sampler: str) -> None:
    diff = Diffusion(process, target, sampler=sampler, num_inference_steps=8)
    calls = []
    plain = _sample_with_hook(diff, None)
    skipped = _sample_with_hook(diff, lambda i, t, x0: calls.append(i))  # returns None: no correction
    assert calls == list(range(8))
    torch.testing.assert_close(skipped, plain, rtol=0, atol=0)
    identity = _sample_with_hook(diff, lambda i, t, x0: x0)  # re-derived from x0 and the implied noise
    torch.testing.assert_close(identity, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("process,target,sampler", [c for c in CONFIGS if c[2] != "ddpm"])
def test_x0_hook_returning_the_target_at_every_step_lands_on_it(process: str, target: str, sampler: str) -> None:
    """A hook that replaces every estimate by x* steers even a poor network's deterministic sampler onto x*."""
    diff = Diffusion(process, target, sampler=sampler, num_inference_steps=10)
    x_star = torch.randn(2, 2, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    out = _sample_with_hook(diff, lambda i, t, x0: x_star.clone())
    torch.testing.assert_close(out, x_star, rtol=1e-3, atol=2e-3)
    assert not torch.allclose(_sample_with_hook(diff, None), x_star, atol=0.1)


def test_x0_hook_of_the_wrong_shape_raises() -> None:
    diff = Diffusion("ddpm", "v", num_inference_steps=2)
    with pytest.raises(ValueError, match="x0 hook returned shape"):
        _sample_with_hook(diff, lambda i, t, x0: x0[:1])


@pytest.mark.parametrize("bias", [0.5, 1.0, 0.1])
def test_timestep_bias_draws_the_tilted_density(bias: float) -> None:
    T, n = 1000, 200_000
    diff = Diffusion("ddpm", "v", num_train_timesteps=T, timestep_bias=bias)
    t = diff.sample_timesteps(n, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) == T - 1
    # expected share of each tenth of [0, T): the integral of 1 - b + 2 b x over it
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    cdf = (1 - bias) * edges + bias * edges**2
    expected = cdf[1:] - cdf[:-1]
    observed = torch.bincount(t // (T // 10), minlength=10).double() / n
    sd = (expected * (1 - expected) / n).sqrt()
    assert ((observed - expected).abs() < 5 * sd).all(), (observed, expected)
    # reproducible under its generator, blind to the global RNG
    torch.manual_seed(7)
    assert torch.equal(t, diff.sample_timesteps(n, torch.device("cpu"), torch.Generator().manual_seed(0)))


def test_zero_timestep_bias_keeps_the_uniform_draws() -> None:
    t = Diffusion("ddpm", "v", timestep_bias=0.0).sample_timesteps(500, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.randint(0, 1000, (500,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_timestep_bias_is_refused(bad) -> None:
    with pytest.raises(ValueError, match=r"timestep_bias=.*expected a number in \[0, 1\]"):
        Diffusion("ddpm", "v", timestep_bias=bad)


def test_training_identity_fills_in_new_options_and_leaves_out_the_sampler() -> None:
    old = {"process": "ddpm", "target": "v", "num_train_timesteps": 1000, "schedule": "cosine", "sampler": "ddim",
           "num_inference_steps": 50, "eta": 0.0}  # a checkpoint written before the loss options existed
    ident = Diffusion.training_identity(old)
    assert ident == Diffusion.training_identity({**old, "num_inference_steps": 7, "eta": 0.5, "timestep_bias": 0.0})
    assert ident["timestep_bias"] == 0.0 and ident["loss_weighting"] == "uniform" and "sampler" not in ident
    assert ident != Diffusion.training_identity({**old, "timestep_bias": 0.5})
