"""The denoiser-training job's schema (DDPM on the pretraining data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_robust.config.common import RunConfig, WandbConfig


@dataclass
class DenoiserJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES: dict[str, tuple[str, ...]] = {}
