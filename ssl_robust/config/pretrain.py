"""The pretraining job's schema."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_robust.config.common import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
    ViewsConfig,
    WandbConfig,
)


@dataclass
class DenoiseViewsConfig:
    """Denoised views: noise a view to a random t in [t_min, t_max] and denoise it in one shot
    with a frozen denoiser, so the encoder learns noise-robust features. Off when run is ""."""

    # A denoiser run directory (scripts/train_denoiser.py) or a diffusers UNet folder.
    run: str = ""
    # Which views to replace: "second" or "both".
    mode: str = "second"
    t_min: int = 0
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
