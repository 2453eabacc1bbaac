"""The evaluation job's schema (clean, corruptions, attacks, calibration, OOD, latency)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_robust.config.common import RunConfig, WandbConfig


@dataclass
class EvaluateConfig:
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES: dict[str, tuple[str, ...]] = {}
