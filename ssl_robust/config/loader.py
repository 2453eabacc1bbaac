"""The one place that reads YAML and the command line into a job's typed schema.

Every job has one schema (a tree of dataclasses). Its defaults are the embedded default job;
YAML presets in ``configs/<job>/`` and ``key=value`` command-line overrides only override it:

    cfg = load_config(PretrainConfig, ["byol_cifar10", "trainer.max_epochs=50"], job="pretrain")

OmegaConf struct mode rejects unknown keys and wrong types; we re-raise those as
:class:`ConfigError` naming the key and the valid choices before any work starts.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ssl_robust.config import denoiser, evaluate, finetune, pretrain
from ssl_robust.config.common import COMMON_CHOICES, COMMON_RANGES, ConfigError, Range
from ssl_robust.files import private_tmp

T = TypeVar("T")

# Each job: its schema and the closed value sets of its keys (shared sections + its own).
# Registries (METHODS, datasets, ...) have tests keeping these sets equal to the code.
SCHEMAS: dict[str, type] = {
    "pretrain": pretrain.PretrainConfig,
    "denoiser": denoiser.DenoiserJobConfig,
    "finetune": finetune.FinetuneConfig,
    "evaluate": evaluate.EvaluateConfig,
}
_JOB_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": pretrain.CHOICES,
    "denoiser": denoiser.CHOICES,
    "finetune": finetune.CHOICES,
    "evaluate": evaluate.CHOICES,
}


# ... and the valid ranges of its numeric keys (shared + its own; the evaluation job checks its
# value lists and ranges together when it starts, pipelines.evaluate.check_config).
_JOB_RANGES: dict[str, dict[str, Range]] = {
    "pretrain": pretrain.RANGES,
    "denoiser": denoiser.RANGES,
    "finetune": finetune.RANGES,
    "evaluate": {},
}


def job_choices(job: str) -> dict[str, tuple[str, ...]]:
    if job not in SCHEMAS:
        raise ConfigError(f"unknown job {job!r}; choose from {sorted(SCHEMAS)}")
    return {**COMMON_CHOICES, **_JOB_CHOICES[job]}


def job_ranges(job: str) -> dict[str, Range]:
    if job not in SCHEMAS:
        raise ConfigError(f"unknown job {job!r}; choose from {sorted(SCHEMAS)}")
    return {**COMMON_RANGES, **_JOB_RANGES[job]}


CONFIG_ROOT_ENV = "SSL_ROBUST_CONFIGS"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def config_root() -> Path:
    """The YAML presets folder: ``configs/`` of the source tree, or $SSL_ROBUST_CONFIGS."""
    env = os.environ.get(CONFIG_ROOT_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


def available_presets(job: str) -> list[str]:
    folder = config_root() / job
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_preset(preset: str, job: str) -> Path:
    """A preset given by name (``configs/<job>/<name>.yaml``) or by path."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") or os.sep in preset:
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    candidate = config_root() / job / f"{preset}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown {job} preset {preset!r}; choose from {available_presets(job)} "
            f"or give a path to a YAML file"
        )
    return candidate


def _valid_keys(node: Any) -> list[str]:
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


def _unknown_key_error(schema: DictConfig, full_key: str) -> ConfigError:
    parent_key, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    valid = _valid_keys(parent)
    hint = difflib.get_close_matches(leaf, valid, n=1)
    where = f"under {parent_key!r}" if parent_key else "at the top level"
    msg = f"unknown config key {full_key!r}; valid keys {where}: {', '.join(valid)}"
    if hint:
        msg += f" (did you mean {(parent_key + '.' if parent_key else '') + hint[0]!r}?)"
    return ConfigError(msg)


def _expand_group_shorthand(schema: DictConfig, overrides: list[str]) -> list[str]:
    """``method=byol`` means ``method.name=byol`` for sections that have a ``name`` key."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = schema.get(key) if "." not in key else None
        if isinstance(node, DictConfig) and "name" in node and not value.startswith("{"):
            out.append(f"{key}.name={value}")
        else:
            out.append(item)
    return out


def _merge(base: DictConfig, other: DictConfig, schema: DictConfig, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
        assert isinstance(merged, DictConfig)
        return merged
    except (ConfigKeyError, ConfigAttributeError) as err:
        raise _unknown_key_error(schema, str(err.full_key)) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        expected = _expected_type(schema, key)
        raise ConfigError(
            f"invalid value for {key!r} in {source}: {(err.msg or str(err)).splitlines()[0]}"
            + (f" (expected {expected})" if expected else "")
        ) from None


def _expected_type(schema: DictConfig, key: str) -> str:
    value = OmegaConf.select(schema, key, default=None, throw_on_missing=False)
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float, str)):
        return type(value).__name__
    if OmegaConf.is_list(value):
        return "a list"
    return ""


def validate_choices(cfg: DictConfig, choices: dict[str, tuple[str, ...]]) -> None:
    """Check every key with a closed set of values; raise naming the valid ones."""
    for key, valid in choices.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if value not in valid:
            raise ConfigError(f"invalid value {value!r} for {key!r}; choose from {list(valid)}")


def validate_ranges(cfg: DictConfig, ranges: dict[str, Range]) -> None:
    """Check every numeric key with a valid range that the config has; raise naming it."""
    for key, (ok, valid) in ranges.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not ok(value):
            raise ConfigError(f"invalid value {value!r} for {key!r}: must be {valid}")


def load_config(
    schema: type[T], args: list[str] | None = None, job: str = "pretrain"
) -> DictConfig:
    """Build a validated config: schema defaults <- preset YAML(s) <- ``key=value`` overrides.

    Args:
        schema: the job's dataclass schema.
        args: command-line arguments. An argument without ``=`` is a preset (a name in
            ``configs/<job>/`` or a path to a YAML file); the rest are dotlist overrides.
        job: the job name, used to find presets.

    Returns:
        A read-only-structure DictConfig (struct mode: unknown keys raise).
    """
    args = list(args or [])
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    cfg = base
    presets = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    for preset in presets:
        path = resolve_preset(preset, job)
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file {str(path)!r}: {err}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping")
        cfg = _merge(cfg, loaded, base, source=str(path))
    if overrides:
        expanded = _expand_group_shorthand(base, overrides)
        try:
            dotlist = OmegaConf.from_dotlist(expanded)
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None
        cfg = _merge(cfg, dotlist, base, source="the command line")
    validate_choices(cfg, job_choices(job))
    validate_ranges(cfg, job_ranges(job))
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path)
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def schema_keys(schema: type) -> list[str]:
    """All dotted leaf keys of a schema (used in docs and tests)."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for f in fields(cls):  # type: ignore[arg-type]
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            if is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                keys.append(f"{prefix}{f.name}")

    walk(schema, "")
    return keys
