"""The pretraining job's schema."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_robust.config.common import (
    MOMENTUM,
    DataConfig,
    MethodConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    Range,
    RunConfig,
    TrainerConfig,
    ViewsConfig,
    WandbConfig,
    above,
    at_least,
)


@dataclass
class DenoiseViewsConfig:
    """Denoised views: noise a view to a random t in [t_min, t_max] and denoise it in one shot
    with a frozen denoiser, so the encoder learns noise-robust features. Off when run is ""."""

    # A denoiser run directory (scripts/train_denoiser.py) or a diffusers UNet folder.
    run: str = ""
    # Which views to replace: "second" or "both".
    mode: str = "second"
    # The smallest diffusion step of the random t (an image drawn t = 0 stays clean).
    t_min: int = 0
    # The largest diffusion step of the random t, >= t_min and at most the denoiser's T.
    t_max: int = 100


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    denoise: DenoiseViewsConfig = field(default_factory=DenoiseViewsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "method.name": ("byol", "simclr"),
    "optim.name": ("lars", "sgd"),
    "optim.lr_scaling": ("linear", "none", "sqrt"),
    "denoise.mode": ("both", "second"),
}

# Numeric ranges of this job's own keys, checked when the config loads (with the shared ones).
RANGES: dict[str, Range] = {
    "optim.base_lr": above(0),
    "optim.reference_batch": at_least(1),
    "optim.momentum": MOMENTUM,
    "optim.weight_decay": at_least(0),
    "optim.warmup_epochs": at_least(0),
    "denoise.t_min": at_least(0),
    "denoise.t_max": at_least(0),
}
