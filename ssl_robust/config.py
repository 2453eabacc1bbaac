"""Typed configuration schemas and the one place that reads YAML and the command line.

Every job has one schema (a tree of dataclasses). Its defaults are the embedded default job;
YAML presets in ``configs/<job>/`` and ``key=value`` command-line overrides only override it:

    cfg = load_config(PretrainConfig, ["byol_cifar10", "trainer.max_epochs=50"], job="pretrain")

OmegaConf struct mode rejects unknown keys and wrong types; we re-raise those as
:class:`ConfigError` naming the key and the valid choices before any work starts.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")

CONFIG_ROOT_ENV = "SSL_ROBUST_CONFIGS"


class ConfigError(ValueError):
    """A config key, type, value or preset is invalid."""


# ---------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    # Run directory: the unit of resume. "" derives runs/<job>-<method>-<data>.
    dir: str = ""
    seed: int = 0
    # Rerunning with the same directory continues from checkpoints/last.ckpt.
    resume: bool = True


@dataclass
class DataConfig:
    # digits: the embedded default (scikit-learn's 1,797 real 8x8 handwritten digits, upsampled),
    # needs no download. cifar10/cifar100/stl10 through torchvision; imagefolder: any tree.
    name: str = "digits"
    root: str = "data"
    download: bool = False
    # 0 keeps the native size (digits: upsampled from 8 to 16 px, CIFAR: 32, STL-10: 96).
    image_size: int = 0
    # Held-out fraction when the source has no separate validation split.
    val_fraction: float = 0.2
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 2
    # imagefolder: decode every image once into a uint8 array (cached on disk next to the run).
    in_memory: bool = True
    # Unreadable image files: false raises naming the file; true skips them and reports a count.
    skip_bad_images: bool = False
    # Normalisation; empty lists take the dataset's own statistics.
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


@dataclass
class ViewsConfig:
    """Parameters of lightly's SimCLR/BYOL view transforms that the presets change."""

    # Defaults suit the 16-px digits (the presets set lightly's CIFAR values 0.08 and 0.5):
    # tiny crops of a digit leave nothing to recognise and a mirrored digit is another symbol.
    min_scale: float = 0.3
    hf_prob: float = 0.0
    cj_prob: float = 0.8
    cj_strength: float = 1.0
    random_gray_scale: float = 0.2
    # Blur is off at 32 px (lightly's CIFAR-10 benchmark; solo-learn). >0 turns it on.
    gaussian_blur: float = 0.0


@dataclass
class ModelConfig:
    # resnet18_cifar, resnet50_cifar, convnet, a torchvision model name ("tv:resnet34")
    # or a timm model name ("timm:resnet26d").
    backbone: str = "convnet"
    # Base width of the small "convnet" backbone (ignored by the others).
    width: int = 32


@dataclass
class MethodConfig:
    name: str = "simclr"
    # SimCLR: NT-Xent temperature (Chen et al. 2020).
    temperature: float = 0.5
    proj_hidden_dim: int = 512
    proj_out_dim: int = 128
    # BYOL: prediction head width and the start of the cosine momentum schedule (tau -> 1).
    pred_hidden_dim: int = 1024
    base_tau: float = 0.99


@dataclass
class OptimConfig:
    name: str = "sgd"
    # The learning rate at reference_batch; scaled to the global batch by lr_scaling.
    base_lr: float = 0.06
    reference_batch: int = 128
    lr_scaling: str = "linear"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0


@dataclass
class TrainerConfig:
    max_epochs: int = 15
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    channels_last: bool = False
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    log_every_n_steps: int = 10
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    deterministic: bool = False
    progress_bar: bool = True
    fast_dev_run: bool = False


@dataclass
class MonitorConfig:
    # kNN classifier on the val split (Wu et al. 2018: cosine similarity, k=200, T=0.1).
    knn_k: int = 200
    knn_t: float = 0.1
    every_n_epochs: int = 1
    online_probe: bool = True


@dataclass
class WandbConfig:
    mode: str = "disabled"
    project: str = "ssl_robust"
    entity: str = ""
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    job_type: str = ""
    init_timeout_s: int = 300


# ---------------------------------------------------------------------------------------------
# Job schemas
# ---------------------------------------------------------------------------------------------


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


SCHEMAS: dict[str, type] = {"pretrain": PretrainConfig}

# Closed sets of values, checked at load time. Registries (METHODS, datasets) have tests that
# keep these lists equal to the code that implements them.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("cifar10", "cifar100", "digits", "imagefolder", "stl10"),
    "method.name": ("byol", "simclr"),
    "optim.name": ("lars", "sgd"),
    "optim.lr_scaling": ("linear", "none", "sqrt"),
    "trainer.accelerator": ("auto", "cpu", "cuda", "gpu"),
    "trainer.precision": ("16-mixed", "32-true", "bf16-mixed", "bf16-true"),
    "trainer.strategy": ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"),
    "wandb.mode": ("disabled", "offline", "online"),
}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def config_root() -> Path:
    """The YAML presets folder: ``configs/`` of the source tree, or $SSL_ROBUST_CONFIGS."""
    env = os.environ.get(CONFIG_ROOT_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


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


def validate_choices(cfg: DictConfig) -> None:
    """Check every key with a closed set of values; raise naming the valid ones."""
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if value not in valid:
            raise ConfigError(f"invalid value {value!r} for {key!r}; choose from {list(valid)}")


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
    validate_choices(cfg)
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
    tmp = path.with_suffix(path.suffix + ".tmp")
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
