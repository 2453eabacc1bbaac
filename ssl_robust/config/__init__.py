"""Typed config schemas (one per job) and their loader.

    cfg = load_config(PretrainConfig, ["byol_cifar10", "trainer.max_epochs=50"], job="pretrain")

Schema defaults are each job's embedded default; presets in ``configs/<job>/`` and ``key=value``
arguments only override them. Unknown keys, wrong types and invalid values raise
:class:`ConfigError` naming the key and the valid choices before any work starts.
"""

from ssl_robust.config.common import (
    COMMON_CHOICES,
    ConfigError,
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
from ssl_robust.config.denoiser import DenoiserJobConfig
from ssl_robust.config.evaluate import EvaluateConfig
from ssl_robust.config.finetune import FinetuneConfig
from ssl_robust.config.loader import (
    SCHEMAS,
    available_presets,
    config_root,
    job_choices,
    job_ranges,
    load_config,
    save_config,
    schema_keys,
    to_dict,
    validate_choices,
)
from ssl_robust.config.pretrain import PretrainConfig

__all__ = [
    "COMMON_CHOICES",
    "SCHEMAS",
    "ConfigError",
    "DataConfig",
    "DenoiserJobConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "MethodConfig",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "TrainerConfig",
    "ViewsConfig",
    "WandbConfig",
    "available_presets",
    "config_root",
    "job_choices",
    "job_ranges",
    "load_config",
    "save_config",
    "schema_keys",
    "to_dict",
    "validate_choices",
]
