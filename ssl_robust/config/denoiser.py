"""The denoiser-training job's schema (DDPM on the pretraining data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_robust.config.common import (
    MOMENTUM,
    UNIT,
    DataConfig,
    Range,
    RunConfig,
    TrainerConfig,
    WandbConfig,
    above,
    at_least,
)


@dataclass
class DenoiserConfig:
    # A key of ssl_robust.purify.UNET_PRESETS. "tiny" (68k parameters) trains on a 2-core CPU
    # in minutes; "ddpm-cifar10" is the 35.7M-parameter google/ddpm-cifar10-32 architecture.
    unet: str = "tiny"
    # Diffusion steps T of the linear beta schedule (Ho et al. 2020, Sec. 4: T = 1000).
    num_train_timesteps: int = 1000
    # The schedule's first beta (Ho et al.: 1e-4); <= beta_end.
    beta_start: float = 1e-4
    # The schedule's last beta, at step T (Ho et al.: 0.02).
    beta_end: float = 0.02
    # Dropout in the UNet's residual blocks (Ho et al. 2020, App. B: 0.1 on CIFAR-10).
    dropout: float = 0.0
    # AdamW's peak learning rate (DDPM: 2e-4, warmup 5000, constant).
    lr: float = 2e-3
    # AdamW's (decoupled) weight decay.
    weight_decay: float = 0.0
    # Optimiser steps of linear warmup from 0 to lr.
    warmup_steps: int = 50
    # After the warmup: cosine decay to 0 over the run, or constant.
    lr_schedule: str = "cosine"
    # Upper bound of the EMA decay (ramped as (1 + n) / (10 + n)); DDPM uses 0.9999 over 800k
    # steps. The EMA weights are what the run exports.
    ema_decay: float = 0.995
    # val/mse_t<lo>-<hi>: the validation MSE in this many equal timestep ranges.
    num_timestep_buckets: int = 10


@dataclass
class ImageViewsConfig:
    # Random horizontal flips of the training images (0.5 for natural images); off for
    # digits, where a mirrored digit is another symbol.
    hf_prob: float = 0.0


@dataclass
class SamplesConfig:
    # Image grids written to <run>/samples/ (and to wandb) every this many epochs and at the end.
    every_n_epochs: int = 5
    # Images per grid.
    n: int = 16
    # Sample grid: generation from pure noise (t = T) with the EMA weights, by ddim (`steps`
    # steps) or ddpm (all T steps).
    sampler: str = "ddim"
    # DDIM steps of the sample grid, and of the purification grid with purify_sampler=ddim
    # (there capped at t_star); at most denoiser.num_train_timesteps.
    steps: int = 50
    # Purification grid: val images diffused to t_star (DiffPure's t* = 0.1 is step 100 of 1000)
    # and purified with purify_sampler.
    t_star: int = 100
    # ddpm: ancestral steps t_star .. 1; ddim: `steps` deterministic steps; oneshot: the
    # predicted x0 after one UNet call.
    purify_sampler: str = "ddpm"
    # Seed of the grids' noise: grids of different epochs use the same noise, so they compare.
    seed: int = 0


def _trainer_defaults() -> TrainerConfig:
    # Gradient clipping at 1.0 as in the DDPM reference training (Ho et al. 2020, App. B).
    return TrainerConfig(max_epochs=40, gradient_clip_val=1.0)


@dataclass
class DenoiserJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ImageViewsConfig = field(default_factory=ImageViewsConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    trainer: TrainerConfig = field(default_factory=_trainer_defaults)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# Kept equal to ssl_robust.purify.UNET_PRESETS and SAMPLERS by tests/test_train_denoiser.py.
CHOICES: dict[str, tuple[str, ...]] = {
    "denoiser.unet": ("ddpm-cifar10", "small", "tiny"),
    "denoiser.lr_schedule": ("constant", "cosine"),
    "samples.sampler": ("ddim", "ddpm"),
    "samples.purify_sampler": ("ddim", "ddpm", "oneshot"),
}

# Numeric ranges of this job's own keys, checked when the config loads (with the shared ones).
# Bounds that depend on another key (samples.steps <= denoiser.num_train_timesteps) are checked
# when the job starts.
RANGES: dict[str, Range] = {
    "denoiser.num_train_timesteps": at_least(1),
    "denoiser.beta_start": above(0),
    "denoiser.beta_end": ((lambda v: 0 < v < 1), "in (0, 1)"),
    "denoiser.dropout": MOMENTUM,  # in [0, 1)
    "denoiser.lr": above(0),
    "denoiser.weight_decay": at_least(0),
    "denoiser.warmup_steps": at_least(0),
    "denoiser.ema_decay": UNIT,
    "denoiser.num_timestep_buckets": at_least(1),
    "samples.every_n_epochs": at_least(1),
    "samples.n": at_least(1),
    "samples.steps": at_least(1),
    "samples.t_star": at_least(0),
}
