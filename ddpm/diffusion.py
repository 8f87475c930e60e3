"""Diffusion process in latent space: noising, training targets, x0 recovery, sampling loops, CFG.

Noise schedules and update rules come from ``monai.networks.schedulers`` (DDPM, DDIM, rectified
flow); this module adds what they leave open: the training target by name (eps | v | x0), the loss,
x0 recovery, a sampling loop that takes a ``torch.Generator`` (with an optional hook that corrects the
clean-latent estimate at each step, e.g. measurement guidance), and classifier-free guidance. The
network is passed in as a function ``model_fn(x_t, t) -> prediction``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from torch import nn

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``hook(i, t, x0) -> corrected x0 or None``: step index, (B,) timesteps, (B, C, D, H, W) fp32 estimate.
X0Hook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]

_MONAI_TARGET = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
PROCESSES = ("ddpm", "rflow")
#: Per-timestep weights of the training loss: ``uniform`` (plain MSE on the target) or ``min_snr`` (Min-SNR-gamma,
#: Hang et al. 2023: the loss weighted as ``min(SNR, gamma)`` times the squared error of the implied clean latent).
LOSS_WEIGHTINGS = ("uniform", "min_snr")
SAMPLERS = {"ddpm": ("ddim", "ddpm"), "rflow": ("rflow",)}


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class Diffusion:
    """Noise process, training loss and sampler for one configuration.

    Args:
        process: ``"ddpm"`` (Gaussian, variance-preserving) or ``"rflow"`` (rectified flow).
        target: what the network predicts: ``"eps"``, ``"v"`` or ``"x0"``; rectified flow only takes
            ``"v"`` (velocity x0 - noise, MONAI's convention).
        num_train_timesteps: T; timesteps are integers in [0, T).
        schedule: MONAI beta schedule name for ``ddpm`` (``linear_beta``, ``scaled_linear_beta``,
            ``sigmoid_beta``, ``cosine``).
        sampler: default sampler: ``"ddim"`` or ``"ddpm"`` (ancestral: DDIM with eta = 1) for ``ddpm``;
            ``"rflow"`` for ``rflow``.
        num_inference_steps: default sampling steps.
        eta: DDIM stochasticity (0 = deterministic); the ``"ddpm"`` sampler always uses 1.
        loss_weighting: ``"uniform"`` or ``"min_snr"`` (see :data:`LOSS_WEIGHTINGS`); training only.
        min_snr_gamma: the SNR cap of ``"min_snr"`` (> 0).
        timestep_bias: tilt of the training timesteps towards the noisy end, in [0, 1]: their density on
            ``t / T`` in [0, 1] is ``1 - b + 2 b t / T`` (0 = uniform; 0.5 draws the noisiest timesteps three times
            as often as the cleanest). Training only.
    """

    def __init__(
        self,
        process: str = "ddpm",
        target: str = "eps",
        num_train_timesteps: int = 1000,
        schedule: str = "cosine",
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        eta: float = 0.0,
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        timestep_bias: float = 0.0,
    ) -> None:
        if process not in PROCESSES:
            raise ValueError(f"process={process!r}, expected one of {PROCESSES}")
        if target not in _MONAI_TARGET:
            raise ValueError(f"target={target!r}, expected one of {tuple(_MONAI_TARGET)}")
        if process == "rflow" and target != "v":
            raise ValueError(f"rectified flow predicts the velocity; target must be 'v', got {target!r}")
        if sampler not in SAMPLERS[process]:
            raise ValueError(f"sampler={sampler!r} does not fit process={process!r}; expected {SAMPLERS[process]}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r}, expected one of {LOSS_WEIGHTINGS}")
        if isinstance(min_snr_gamma, bool) or not (isinstance(min_snr_gamma, (int, float)) and 0 < min_snr_gamma < math.inf):
            raise ValueError(f"min_snr_gamma={min_snr_gamma!r}, expected a finite number > 0")
        if isinstance(timestep_bias, bool) or not (isinstance(timestep_bias, (int, float)) and 0 <= timestep_bias <= 1):
            raise ValueError(f"timestep_bias={timestep_bias!r}, expected a number in [0, 1]")
        self.process = process
        self.target = target
        self.timestep_bias = float(timestep_bias)
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.num_train_timesteps = int(num_train_timesteps)
        self.schedule = schedule
        self.sampler = sampler
        self.num_inference_steps = int(num_inference_steps)
        self.eta = float(eta)
        if process == "ddpm":
            self.scheduler = DDPMScheduler(
                num_train_timesteps, schedule=schedule, clip_sample=False, prediction_type=_MONAI_TARGET[target]
            )
        else:
            self.scheduler = RFlowScheduler(num_train_timesteps, use_discrete_timesteps=True)

    def hparams(self) -> dict:
        """Plain-dict configuration (what a checkpoint stores to rebuild this object)."""
        return {
            "process": self.process,
            "target": self.target,
            "num_train_timesteps": self.num_train_timesteps,
            "schedule": self.schedule,
            "sampler": self.sampler,
            "num_inference_steps": self.num_inference_steps,
            "eta": self.eta,
            "loss_weighting": self.loss_weighting,
            "min_snr_gamma": self.min_snr_gamma,
            "timestep_bias": self.timestep_bias,
        }

    #: the :meth:`hparams` that decide what training optimises (the sampler settings may change between runs)
    TRAINING_KEYS = ("process", "target", "num_train_timesteps", "schedule", "loss_weighting", "min_snr_gamma",
                     "timestep_bias")

    @classmethod
    def training_identity(cls, hparams: dict) -> dict:
        """The training-relevant part of stored ``hparams``, with the defaults of options added since filled in (what a
        resumed run must share with its checkpoint)."""
        full = cls(**hparams).hparams()
        return {k: full[k] for k in cls.TRAINING_KEYS}

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) long timesteps in [0, T): uniform, or tilted towards the noisy end by ``timestep_bias``."""
        gen_device = generator.device if generator is not None else device
        if self.timestep_bias == 0:
            return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=gen_device).to(device)
        b = self.timestep_bias
        u = torch.rand((n,), generator=generator, device=gen_device).double()
        x = (2 * u) / ((1 - b) + ((1 - b) ** 2 + 4 * b * u).sqrt())  # inverse of the CDF (1 - b) x + b x^2, stable at b -> 0
        return (x * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1).to(device)

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ab = self.scheduler.alphas_cumprod.to(device=t.device)[t.long()]
        return _bcast(ab, like).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from x0 (B, C, D, H, W), noise (same) and t (B,), computed in fp32."""
        with torch.autocast(device_type=x0.device.type, enabled=False):
            if self.process == "ddpm":
                ab = self._alpha_bar(t, x0)
                return ab.sqrt() * x0.float() + (1 - ab).sqrt() * noise.float()
            return self.scheduler.add_noise(x0.float(), noise.float(), t)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target for the configured ``target``."""
        with torch.autocast(device_type=x0.device.type, enabled=False):
            x0, noise = x0.float(), noise.float()
            if self.process == "rflow":
                return x0 - noise
            if self.target == "eps":
                return noise
            if self.target == "x0":
                return x0
            ab = self._alpha_bar(t, x0)
            return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """Invert a network prediction to the clean latent x0 (fp32)."""
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            x_t, pred = x_t.float(), prediction.float()
            if self.process == "rflow":
                s = _bcast(t.float() / self.num_train_timesteps, x_t)
                return x_t + s * pred
            if self.target == "x0":
                return pred
            ab = self._alpha_bar(t, x_t)
            if self.target == "eps":
                return (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
            return ab.sqrt() * x_t - (1 - ab).sqrt() * pred

    def implied_noise(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that, added to ``x0`` at ``t``, gives ``x_t`` (inverse of :meth:`add_noise` in the noise; fp32).

        Where ``t`` carries no noise (rectified flow at t = 0) the noise is undetermined and returned as zero.
        """
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            x_t, x0 = x_t.float(), x0.float()
            if self.process == "ddpm":
                ab = self._alpha_bar(t, x_t)
                return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
            s = _bcast(t.float() / self.num_train_timesteps, x_t)  # noise fraction of x_t (MONAI convention)
            return torch.where(s > 0, (x_t - (1 - s) * x0) / s.clamp_min(1e-12), torch.zeros_like(x_t))

    def training_loss(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared error between ``model_fn(x_t, t)`` and the target.

        Args:
            model_fn: network closure taking (x_t (B, C, D, H, W), t (B,)).
            x0: (B, C, D, H, W) clean normalised latents.
            t: optional fixed (B,) timesteps (validation); sampled uniformly otherwise.
            generator: RNG for timesteps and noise (on x0's device).

        Returns:
            scalar fp32 loss.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x_t = self.add_noise(x0, noise, t)
        pred = model_fn(x_t, t)
        target = self.training_target(x0, noise, t)
        if self.loss_weighting == "uniform":
            return nn.functional.mse_loss(pred.float(), target)
        per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
        return (self.loss_weights(t) * per_sample).mean()

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 weights of the per-sample target MSE at timesteps ``t`` (all ones for ``uniform``).

        ``min_snr``: ``min(SNR, gamma)`` times the factor by which the target's squared error becomes the implied
        clean latent's (``1 / SNR`` for eps, ``1 / (SNR + 1)`` for v, 1 for x0; the squared noise fraction for
        rectified flow's velocity), so every step counts as a capped-SNR-weighted x0 error.
        """
        if self.loss_weighting == "uniform":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        if self.process == "rflow":
            s = t.float() / self.num_train_timesteps  # noise fraction; x0 error = s * velocity error
            snr = ((1 - s) / s.clamp_min(1e-12)).pow(2)
            return snr.clamp_max(self.min_snr_gamma) * s.pow(2)
        ab = self.scheduler.alphas_cumprod.to(device=t.device)[t.long()].float()
        snr = ab / (1 - ab).clamp_min(1e-12)
        factor = {"eps": 1 / snr.clamp_min(1e-12), "v": 1 / (snr + 1), "x0": torch.ones_like(snr)}[self.target]
        return snr.clamp_max(self.min_snr_gamma) * factor

    # ------------------------------------------------------------------ sampling
    def make_sampler(self, sampler: str | None = None):
        """A fresh MONAI scheduler for sampling (schedulers keep per-run state)."""
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS[self.process]:
            raise ValueError(f"sampler={sampler!r} does not fit process={self.process!r}; expected {SAMPLERS[self.process]}")
        kw = dict(schedule=self.schedule, clip_sample=False, prediction_type=_MONAI_TARGET[self.target])
        if sampler in ("ddim", "ddpm"):
            # MONAI's DDPMScheduler.step always steps t -> t-1, so with fewer inference than training steps it
            # leaves most of the noise in; DDIM with eta = 1 is the DDPM posterior for any stride (see sample)
            return DDIMScheduler(self.num_train_timesteps, **kw)
        return RFlowScheduler(self.num_train_timesteps, use_discrete_timesteps=True)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        x0_hook: X0Hook | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from pure noise.

        Args:
            model_fn: network closure (x_t, t) -> prediction (use :func:`guided` for CFG).
            noise: (B, C, D, H, W) starting noise (draw it with the same generator for reproducibility).
            generator: RNG for stochastic samplers (DDPM, DDIM with eta > 0), on the noise's device.
            num_inference_steps: defaults to the configured value.
            sampler: defaults to the configured sampler.
            x0_hook: optional ``hook(i, t, x0)`` called at every step ``i`` with the clean-latent estimate;
                when it returns a corrected ``x0'``, the step continues from ``x0'`` with the same implied
                noise (``x_t`` moves to ``add_noise(x0', noise, t)`` and the prediction is re-derived), so
                every sampler takes the correction in its own update rule (manifold-preserving guidance).
                It runs with gradients disabled; a hook that needs them enables them itself.

        Returns:
            (B, C, D, H, W) fp32 sample (normalised latent space).
        """
        steps = int(num_inference_steps or self.num_inference_steps)
        sampler = sampler or self.sampler
        sched = self.make_sampler(sampler)
        sched.set_timesteps(steps, device=noise.device)
        timesteps = sched.timesteps
        x = noise.float()
        b = x.shape[0]
        for i, t in enumerate(timesteps):
            t_batch = torch.full((b,), int(t), device=x.device, dtype=torch.long)
            pred = model_fn(x, t_batch).float()
            if x0_hook is not None:
                x, pred = self._apply_x0_hook(x0_hook, i, x, t_batch, pred)
            if isinstance(sched, RFlowScheduler):
                nxt = int(timesteps[i + 1]) if i + 1 < len(timesteps) else 0
                x, _ = sched.step(pred, int(t), x, nxt)
            else:
                eta = 1.0 if sampler == "ddpm" else self.eta  # ancestral sampling: the full posterior noise
                x, _ = sched.step(pred, int(t), x, eta=eta, generator=generator)
        return x

    def _apply_x0_hook(self, hook: X0Hook, i: int, x: torch.Tensor, t: torch.Tensor,
                       pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, prediction)`` after the hook's correction of the x0 estimate (unchanged when it returns None)."""
        x0 = self.predict_x0(x, t, pred)
        corrected = hook(i, t, x0)
        if corrected is None:
            return x, pred
        if corrected.shape != x0.shape:
            raise ValueError(f"x0 hook returned shape {tuple(corrected.shape)}; expected {tuple(x0.shape)}")
        noise = self.implied_noise(x, t, x0)
        corrected = corrected.float()
        return self.add_noise(corrected, noise, t), self.training_target(corrected, noise, t)


def guided(
    model: nn.Module,
    guidance_scale: float = 1.0,
    y: torch.Tensor | None = None,
    ap: torch.Tensor | None = None,
    lat: torch.Tensor | None = None,
    geometry: torch.Tensor | None = None,
) -> ModelFn:
    """Wrap a BiFlowNet-like model as ``model_fn(x_t, t)`` with classifier-free guidance.

    prediction = uncond + scale * (cond - uncond). With scale 1 the conditional prediction is returned
    exactly (one forward pass); otherwise conditional and unconditional halves run as one batch.

    Args:
        model: callable ``model(x, t, y=, ap=, lat=, drop=, geometry=)``.
        guidance_scale: CFG scale (1 = plain conditional model).
        y: (B,) labels or None; ap, lat: (B, 1, H, W) X-rays or None.
        geometry: (B, 2, 10) packed geometry of each X-ray pair, or None (the model's default).
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if guidance_scale == 1.0:
            return model(x, t, y=y, ap=ap, lat=lat, drop=torch.zeros(b, dtype=torch.bool, device=x.device),
                         geometry=geometry)
        two = lambda v: None if v is None else torch.cat([v, v], dim=0)  # noqa: E731
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        out = model(two(x), two(t), y=two(y), ap=two(ap), lat=two(lat), drop=drop, geometry=two(geometry))
        cond, uncond = out.float().chunk(2, dim=0)
        return uncond + guidance_scale * (cond - uncond)

    return fn


__all__ = ["Diffusion", "PROCESSES", "SAMPLERS", "X0Hook", "guided"]
