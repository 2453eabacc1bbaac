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
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "method.name": ("byol", "simclr"),
    "optim.name": ("lars", "sgd"),
    "optim.lr_scaling": ("linear", "none", "sqrt"),
}
