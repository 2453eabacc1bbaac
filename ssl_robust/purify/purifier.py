"""Diffusion purification: diffuse an input to t*, then run a trained denoiser back to t = 0.

Time convention (DiffPure, Nie et al. 2022; the DDPM paper's t in 1..T): ``t_star`` counts
forward diffusion steps. ``t_star = 0`` is the clean image (the purifier is the identity), and
x_{t*} has signal level abar_{t*} = ``alphas_cumprod[t_star - 1]``. The UNet is conditioned on the
diffusers timestep index ``t - 1``, the index it was trained with for that noise level. DiffPure's
continuous t* = 0.1 on a 1000-step schedule is therefore ``t_star = 100`` and costs 100 network
evaluations with the DDPM sampler.

The step rules are written out below (rather than calling ``scheduler.step``) so that they are
stateless, differentiable and draw their noise from an explicit generator; the tests check them
against ``DDPMScheduler.step`` and ``DDIMScheduler.step``.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "oneshot")
_VARIANCE_TYPES = ("fixed_small", "fixed_large")
_DTYPES = (None, torch.float32, torch.bfloat16)


def t_star_from_sigma(alphas_cumprod: Tensor, sigma: float) -> int:
    """The diffusion step whose noise level matches N(0, sigma^2) noise on [0, 1] images.

    Denoised smoothing (Carlini et al. 2023, Sec. 3): x + N(0, sigma^2) on [0, 1] is
    2x - 1 + N(0, (2 sigma)^2) on [-1, 1], and x_t / sqrt(abar_t) = x_0 + sqrt((1 - abar_t) /
    abar_t) eps, so the matching step is the one with sqrt((1 - abar_t) / abar_t) closest to
    2 sigma.

    Args:
        alphas_cumprod: abar for diffusers indices 0..T-1, shape (T,).
        sigma: Noise std in [0, 1] pixel units, >= 0.

    Returns:
        t* in the module's convention (1..T; 0 when ``sigma == 0``).
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return 0
    abar = alphas_cumprod.double()
    ratio = ((1 - abar) / abar).sqrt()  # (T,)
    return int(torch.argmin((ratio - 2 * sigma).abs())) + 1


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise like ``x`` (shape, dtype), drawn from ``generator`` on its device."""
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return noise.to(x.device)


def predict_x0(x_t: Tensor, eps: Tensor, abar_t: float) -> Tensor:
    """x0 implied by an epsilon prediction (Ho et al. 2020, eq. 4 solved for x0; DDIM eq. 12)."""
    return (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)


def ddpm_step(
    x_t: Tensor,
    eps: Tensor,
    abar_t: float,
    abar_prev: float,
    generator: torch.Generator | None = None,
    clip: float | None = 1.0,
    variance_type: str = "fixed_small",
) -> Tensor:
    """One ancestral DDPM step x_t -> x_{t-1} (Ho et al. 2020, eqs. 6-7 and Algorithm 2).

    Args:
        x_t: Current sample in [-1, 1] units, (B, C, H, W).
        eps: Predicted noise, same shape.
        abar_t: Cumulative signal level at t.
        abar_prev: Cumulative signal level at t - 1 (1.0 when t - 1 is the clean image).
        generator: Source of the step noise.
        clip: Clip the x0 prediction to [-clip, clip]; None disables.
        variance_type: ``"fixed_small"`` (posterior variance beta-tilde, eq. 7) or
            ``"fixed_large"`` (beta_t); Ho et al. Sec. 3.2 report both work.

    Returns:
        x_{t-1}, same shape. No noise is added on the last step (t - 1 = 0).
    """
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    x0 = predict_x0(x_t, eps, abar_t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    # Posterior mean mu-tilde(x_t, x0), eq. 7.
    coef_x0 = math.sqrt(abar_prev) * beta_t / (1 - abar_t)
    coef_xt = math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)
    mean = coef_x0 * x0 + coef_xt * x_t
    if abar_prev >= 1.0:
        return mean
    if variance_type == "fixed_small":
        variance = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
    else:
        variance = beta_t
    return mean + math.sqrt(variance) * _randn_like(x_t, generator)


def ddim_step(
    x_t: Tensor, eps: Tensor, abar_t: float, abar_prev: float, clip: float | None = 1.0
) -> Tensor:
    """One deterministic DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12 with sigma_t = 0).

    x_prev = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev) * eps_hat; the x0 prediction is
    clipped like the DDPM sampler's, the direction term keeps the raw eps (as diffusers does).

    Args:
        x_t: Current sample in [-1, 1] units, (B, C, H, W).
        eps: Predicted noise, same shape.
        abar_t: Cumulative signal level at t.
        abar_prev: Cumulative signal level at the next (smaller) step; 1.0 for the clean image.
        clip: Clip the x0 prediction to [-clip, clip]; None disables.

    Returns:
        x_{t_prev}, same shape.
    """
    x0 = predict_x0(x_t, eps, abar_t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps


def ddim_schedule(t_star: int, steps: int) -> list[int]:
    """The steps a k-step DDIM reverse from t* visits, "trailing" spacing (Lin et al. 2024, Tab. 2).

    t_i = round(t* (k - i) / k) for i = 0..k-1, then the clean image. It starts exactly at t*
    (where the input was diffused to) and spaces the rest evenly; ``steps <= t_star`` keeps them
    distinct. With t* = 100 and k = 5 this is [100, 80, 60, 40, 20].
    """
    # Integer round-half-up of t* (k - i) / k.
    return [(2 * t_star * (steps - i) + steps) // (2 * steps) for i in range(steps)]


class Purifier(nn.Module):
    """Diffusion purification of [0, 1] images with a pretrained epsilon-prediction UNet.

    ``forward(x)`` maps x to [-1, 1], diffuses it to t* with the closed form x_t =
    sqrt(abar) x0 + sqrt(1 - abar) eps (Ho et al. 2020, eq. 4), runs the chosen reverse sampler
    back to t = 0, and maps the result to [0, 1]. Samplers:

    - ``"ddpm"``: ancestral DDPM from t* down to 1, as in DiffPure (Nie et al. 2022); t* NFE.
    - ``"ddim"``: deterministic DDIM (eta = 0) with ``ddim_steps`` steps from t*; k NFE.
    - ``"oneshot"``: the x0 prediction at t* (denoised smoothing, Carlini et al. 2023); 1 NFE.
      Equal to ``"ddim"`` with one step.

    The module is differentiable end to end, so exact-gradient attacks can run through it
    (no BPDA approximation needed); ``gradient_checkpointing`` recomputes each UNet call in the
    backward pass so memory grows with the UNet inputs only. The UNet always runs in eval mode,
    even when the purifier sits inside a module that is training. Its parameters are left as
    given; freeze them (``requires_grad_(False)``) when only input gradients are wanted.

    Args:
        unet: Epsilon-prediction UNet trained on [-1, 1] images with ``scheduler``'s schedule.
        scheduler: The DDPM scheduler the UNet was trained with (only its config and
            ``alphas_cumprod`` are read; it is never stepped or mutated).
        t_star: Diffusion steps to add, in [0, T] (see the module docstring).
        sigma: Alternatively, a Gaussian noise std on [0, 1] images; t* is the matching step
            (``t_star_from_sigma``). Give exactly one of ``t_star`` and ``sigma``.
        sampler: One of ``SAMPLERS``.
        ddim_steps: Steps of the ``"ddim"`` sampler, 1 <= k <= t*.
        fixed_noise: Freeze the randomness: every call re-seeds a fresh generator with ``seed``
            on the input's device, so repeated calls on a batch of the same shape use the same
            noise and the purifier is a deterministic function (for attacks that need one, and
            to measure how much randomness alone protects). ``forward`` then takes no generator.
        gradient_checkpointing: Checkpoint each UNet call when gradients are being recorded.
        dtype: ``torch.bfloat16`` runs the UNet under bf16 autocast; ``None`` or
            ``torch.float32`` runs it in fp32. The sampler arithmetic is always fp32.
        seed: Seed used by ``fixed_noise``.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        t_star: int | None = None,
        sigma: float | None = None,
        sampler: str = "ddpm",
        ddim_steps: int = 5,
        fixed_noise: bool = False,
        gradient_checkpointing: bool = False,
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {list(SAMPLERS)}")
        config = scheduler.config
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type != "epsilon":
            raise ValueError(
                f"the purifier needs an epsilon-prediction schedule, got {prediction_type!r}"
            )
        variance_type = config.get("variance_type", "fixed_small")
        if variance_type not in _VARIANCE_TYPES:
            raise ValueError(
                f"unsupported variance_type {variance_type!r}; choose from {list(_VARIANCE_TYPES)}"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; choose from {list(_DTYPES)}")
        if (t_star is None) == (sigma is None):
            raise ValueError(
                f"give exactly one of t_star and sigma, got t_star={t_star}, sigma={sigma}"
            )
        alphas_cumprod = scheduler.alphas_cumprod.detach().float().cpu()  # (T,)
        num_train_timesteps = alphas_cumprod.shape[0]
        if sigma is not None:
            t_star = t_star_from_sigma(alphas_cumprod, sigma)
        assert t_star is not None
        if not 0 <= t_star <= num_train_timesteps:
            raise ValueError(
                f"t_star must be in [0, {num_train_timesteps}] (num_train_timesteps), got {t_star}"
            )
        if sampler == "ddim" and ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {ddim_steps}")
        if sampler == "ddim" and t_star > 0 and ddim_steps > t_star:
            raise ValueError(
                f"ddim_steps must be <= t_star, got ddim_steps={ddim_steps} > {t_star}"
            )

        self.unet = unet.eval()
        self.t_star = int(t_star)
        self.sigma = sigma
        self.sampler = sampler
        self.ddim_steps = ddim_steps
        self.fixed_noise = fixed_noise
        self.gradient_checkpointing = gradient_checkpointing
        self.dtype = dtype
        self.seed = seed
        self.variance_type = variance_type
        clip_sample = config.get("clip_sample", True)
        self.clip = float(config.get("clip_sample_range", 1.0)) if clip_sample else None
        # abar per step in the module's convention: _abar[t] for t = 0..T, _abar[0] = 1 (clean).
        self._abar: list[float] = [1.0, *alphas_cumprod.double().tolist()]
        self.num_train_timesteps = num_train_timesteps

    @property
    def nfe(self) -> int:
        """UNet evaluations per image for the current settings."""
        if self.t_star == 0:
            return 0
        return {"ddpm": self.t_star, "ddim": self.ddim_steps, "oneshot": 1}[self.sampler]

    @property
    def schedule(self) -> list[int]:
        """The steps t the reverse process evaluates the UNet at (it is called with index t - 1)."""
        if self.t_star == 0:
            return []
        if self.sampler == "ddpm":
            return list(range(self.t_star, 0, -1))
        if self.sampler == "ddim":
            return ddim_schedule(self.t_star, self.ddim_steps)
        return [self.t_star]

    @property
    def noise_sigma(self) -> float:
        """The std of Gaussian noise on [0, 1] images that diffusing to t* amounts to:
        x_{t*} = sqrt(abar) (2 (x + sigma eps) - 1) with sigma = sqrt((1 - abar) / abar) / 2
        (denoised smoothing, Carlini et al. 2023); 0 at t* = 0."""
        abar = self._abar[self.t_star]
        return math.sqrt((1 - abar) / abar) / 2

    def train(self, mode: bool = True) -> Purifier:
        """Sets the training flag but keeps the UNet in eval mode (purification is inference)."""
        super().train(mode)
        self.unet.eval()
        return self

    def extra_repr(self) -> str:
        return (
            f"t_star={self.t_star}, sampler={self.sampler!r}, nfe={self.nfe}, "
            f"fixed_noise={self.fixed_noise}, dtype={self.dtype}"
        )

    def _unet(self, x_t: Tensor, t: Tensor) -> Tensor:
        """One UNet call, (B, C, H, W) -> predicted eps in fp32."""
        with torch.autocast(
            device_type=x_t.device.type,
            dtype=torch.bfloat16,
            enabled=self.dtype == torch.bfloat16,
        ):
            eps = self.unet(x_t.to(self.unet.dtype), t).sample
        return eps.float()

    def predict_eps(self, x_t: Tensor, t: int) -> Tensor:
        """The UNet's noise prediction for x_t at step t >= 1 (diffusers timestep index t - 1)."""
        timesteps = torch.full((x_t.shape[0],), t - 1, device=x_t.device, dtype=torch.long)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._unet, x_t, timesteps, use_reentrant=False)
        return self._unet(x_t, timesteps)

    def diffuse(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Samples x_{t*} ~ q(x_{t*} | x0) (Ho et al. 2020, eq. 4); x0 in [-1, 1], (B, C, H, W)."""
        abar = self._abar[self.t_star]
        return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * _randn_like(x0, generator)

    def reverse(self, x_t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Runs the sampler from x_{t*} to the clean image, both in [-1, 1] units, (B, C, H, W).

        The result is not clipped; ``forward`` clips when mapping back to [0, 1].
        """
        if self.t_star == 0:
            return x_t
        x = x_t.float()
        if self.sampler == "oneshot":
            x0 = predict_x0(x, self.predict_eps(x, self.t_star), self._abar[self.t_star])
            return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)
        if self.sampler == "ddim":
            steps = ddim_schedule(self.t_star, self.ddim_steps)
            for t, t_prev in zip(steps, [*steps[1:], 0]):
                eps = self.predict_eps(x, t)
                x = ddim_step(x, eps, self._abar[t], self._abar[t_prev], self.clip)
            return x
        for t in range(self.t_star, 0, -1):
            eps = self.predict_eps(x, t)
            x = ddpm_step(
                x, eps, self._abar[t], self._abar[t - 1], generator, self.clip, self.variance_type
            )
        return x

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Purifies a batch.

        Args:
            x: Images in [0, 1], (B, C, H, W) with C and H = W matching the UNet.
            generator: Source of all noise (the diffusion and, for ``"ddpm"``, every step); may
                live on another device than ``x``. Must be None when ``fixed_noise`` is on.

        Returns:
            Purified images in [0, 1], (B, C, H, W). With t* = 0 the input itself is returned.
        """
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        in_channels = self.unet.config["in_channels"]
        if x.shape[1] != in_channels:
            raise ValueError(f"the UNet expects {in_channels} channels, got {x.shape[1]}")
        size = self.unet.config["sample_size"]
        expected = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"the UNet was built for {expected[0]}x{expected[1]} images, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        if self.fixed_noise:
            if generator is not None:
                raise ValueError("fixed_noise=True draws its own noise; do not pass a generator")
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        if self.t_star == 0:
            return x
        x_t = self.diffuse(x.float() * 2 - 1, generator)  # (B, C, H, W) in [-1, 1] units
        x0 = self.reverse(x_t, generator)
        return ((x0 + 1) / 2).clamp(0, 1).to(x.dtype)
