"""The fine-tuning job's schema (labeled subsets; linear probe or full fine-tune)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_robust.config.common import RunConfig, WandbConfig


@dataclass
class FinetuneConfig:
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES: dict[str, tuple[str, ...]] = {}
