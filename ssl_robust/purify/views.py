"""Denoised views: SSL views passed through a frozen diffusion denoiser before the encoder.

Each image of a replaced view is diffused to its own random step t ~ U{t_min..t_max} with the
closed form x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4) and denoised in
one UNet call by the predicted x0 (denoised smoothing, Carlini et al. 2023). Pairing a clean view
with a denoised one asks the encoder to map an image and its purified version to the same
features, which is what it meets at test time behind a purifier.

Steps follow the :class:`~ssl_robust.purify.purifier.Purifier` convention: ``t`` counts forward
diffusion steps, t = 0 is the clean image (left as it is), and the UNet is conditioned on the
diffusers timestep index t - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import Tensor, nn

from ssl_robust.purify.unet import load_denoiser

MODES: tuple[str, ...] = ("both", "second")
_DTYPES = (None, torch.float32, torch.bfloat16)


class DenoisedViews(nn.Module):
    """Replaces the second (or both) of the normalised SSL views by one-shot denoised versions.

    The UNet is frozen (``requires_grad_(False)``), always runs in eval mode and without
    gradients: the views are data, not part of the encoder's graph. Move the module to the
    device of the views before calling it (the pretraining datamodule does this in
    ``on_after_batch_transfer``).

    Args:
        unet: Epsilon-prediction UNet trained on [-1, 1] images with ``scheduler``'s schedule.
        scheduler: The DDPM schedule it was trained with (only ``alphas_cumprod`` and the
            ``clip_sample`` settings are read).
        t_min: Smallest diffusion step drawn, 0 <= t_min <= t_max.
        t_max: Largest diffusion step drawn, at most the schedule's T.
        mode: ``"second"`` replaces view 1 and leaves view 0 clean; ``"both"`` replaces views
            0 and 1 (each image with its own t and noise).
        mean: Per-channel mean the views were normalised with.
        std: Per-channel std the views were normalised with.
        dtype: ``torch.bfloat16`` runs the UNet under bf16 autocast; ``None`` or
            ``torch.float32`` in fp32. The arithmetic around it is fp32.
    """

    abar: Tensor  # (T + 1,) buffer, abar[0] = 1
    mean: Tensor  # (1, C, 1, 1) buffer
    std: Tensor  # (1, C, 1, 1) buffer

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        t_min: int,
        t_max: int,
        mode: str = "second",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
        if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("denoised views need an epsilon-prediction schedule")
        alphas_cumprod = scheduler.alphas_cumprod.detach().double().cpu()  # (T,)
        num_train_timesteps = alphas_cumprod.shape[0]
        if not 0 <= t_min <= t_max <= num_train_timesteps:
            raise ValueError(
                f"need 0 <= t_min <= t_max <= {num_train_timesteps} (num_train_timesteps), "
                f"got t_min={t_min}, t_max={t_max}"
            )
        channels = int(unet.config["in_channels"])
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), "
                f"got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype}; choose from {list(_DTYPES)}")
        self.unet = unet.eval().requires_grad_(False)
        self.t_min = int(t_min)
        self.t_max = int(t_max)
        self.mode = mode
        self.dtype = dtype
        self.num_train_timesteps = num_train_timesteps
        clip_sample = scheduler.config.get("clip_sample", True)
        self.clip = float(scheduler.config.get("clip_sample_range", 1.0)) if clip_sample else None
        abar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod]).float()
        self.register_buffer("abar", abar, persistent=False)
        mean_t = torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        std_t = torch.tensor([float(s) for s in std]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def train(self, mode: bool = True) -> DenoisedViews:
        """Sets the training flag but keeps the UNet in eval mode (it is frozen)."""
        super().train(mode)
        self.unet.eval()
        return self

    def extra_repr(self) -> str:
        return f"t_min={self.t_min}, t_max={self.t_max}, mode={self.mode!r}, dtype={self.dtype}"

    @torch.no_grad()
    def denoise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noises each normalised image to its own random t and returns the one-shot denoised image.

        Args:
            x: A normalised view batch, (B, C, H, W).
            generator: Source of the steps and the noise; may live on another device than x.

        Returns:
            The denoised batch, normalised like ``x``, same shape and dtype.
        """
        b = x.shape[0]
        gen_device = generator.device if generator is not None else x.device
        t = torch.randint(
            self.t_min, self.t_max + 1, (b,), generator=generator, device=gen_device
        ).to(x.device)  # (B,)
        eps = torch.randn(x.shape, generator=generator, device=gen_device).to(x.device)
        if self.t_max == 0:
            return x
        x0 = (x.float() * self.std + self.mean) * 2 - 1  # (B, C, H, W) in [-1, 1]
        abar = self.abar[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # Ho et al. eq. 4
        with torch.autocast(
            device_type=x.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16
        ):
            # t - 1: the diffusers index of step t (t = 0 rows are discarded below).
            eps_hat = self.unet(x_t.to(self.unet.dtype), (t - 1).clamp(min=0)).sample.float()
        x0_hat = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()  # eq. 4 solved for x0
        if self.clip is not None:
            x0_hat = x0_hat.clamp(-self.clip, self.clip)
        out = ((x0_hat + 1) / 2 - self.mean) / self.std  # back to the views' normalisation
        keep = (t == 0).view(-1, 1, 1, 1)  # t = 0 is the clean image itself
        return torch.where(keep, x.float(), out).to(x.dtype)

    def forward(
        self, views: list[Tensor], generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Returns the views with the second (or the first two) replaced by denoised versions.

        Args:
            views: Normalised view batches, at least two, each (B, C, H, W) with C, H, W
                matching the UNet.
            generator: Source of all randomness (steps, then noise, view by view).

        Returns:
            A new list; views not replaced are the same tensor objects.
        """
        if len(views) < 2:
            raise ValueError(f"expected at least two views, got {len(views)}")
        channels = self.unet.config["in_channels"]
        size = self.unet.config["sample_size"]
        expected = (size, size) if isinstance(size, int) else tuple(size)
        for v in views:
            if v.ndim != 4 or v.shape[1] != channels or tuple(v.shape[-2:]) != expected:
                raise ValueError(
                    f"the denoiser expects views of shape (B, {channels}, {expected[0]}, "
                    f"{expected[1]}), got {tuple(v.shape)}"
                )
        replaced = (1,) if self.mode == "second" else (0, 1)
        return [self.denoise(v, generator) if i in replaced else v for i, v in enumerate(views)]


def load_denoised_views(
    denoiser_run_dir: str | Path,
    t_min: int,
    t_max: int,
    mode: str = "second",
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    dtype: torch.dtype | None = None,
) -> DenoisedViews:
    """Builds :class:`DenoisedViews` from a denoiser run directory (or any diffusers UNet folder).

    Args:
        denoiser_run_dir: A run directory of ``train_denoiser`` (read with ``load_denoiser``).
        t_min: Smallest diffusion step drawn.
        t_max: Largest diffusion step drawn.
        mode: ``"second"`` or ``"both"``.
        mean: Per-channel mean the views were normalised with.
        std: Per-channel std the views were normalised with.
        dtype: UNet compute dtype (None / float32 / bfloat16).

    Returns:
        The module, on the CPU.
    """
    unet, scheduler = load_denoiser(denoiser_run_dir)
    return DenoisedViews(unet, scheduler, t_min, t_max, mode=mode, mean=mean, std=std, dtype=dtype)
