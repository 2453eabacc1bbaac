"""The one place that reads YAML and the command line into a job's typed schema.

Every job has one schema (a tree of dataclasses). Its defaults are the embedded default job;
YAML presets in ``configs/<job>/`` and ``key=value`` command-line overrides only override it:

    cfg = load_config(PretrainConfig, ["byol_cifar10", "trainer.max_epochs=50"], job="pretrain")

OmegaConf struct mode rejects unknown keys and wrong types; we re-raise those as
:class:`ConfigError` naming the key (and the preset file) and the valid choices before any work
starts. Overrides of text keys keep their text as written (``encoder.run=007`` is "007", not
YAML's 7); every other override is read as YAML.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ssl_robust.config import denoiser, evaluate, finetune, pretrain
from ssl_robust.config.common import COMMON_CHOICES, COMMON_RANGES, ConfigError, Range
from ssl_robust.config.describe import format_value
from ssl_robust.files import write_text_atomic

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
# value lists and dependent settings when it starts, pipelines.evaluate.check_config).
_JOB_RANGES: dict[str, dict[str, Range]] = {
    "pretrain": pretrain.RANGES,
    "denoiser": denoiser.RANGES,
    "finetune": finetune.RANGES,
    "evaluate": evaluate.RANGES,
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
        names = available_presets(job)
        hint = difflib.get_close_matches(preset, names, n=1)
        raise ConfigError(
            f"unknown {job} preset {preset!r}; choose from {names} or give a path to a YAML file"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    return candidate


# The source of overrides, as errors name it (a preset is "config file '<path>'").
_COMMAND_LINE = "the command line"


def _valid_keys(node: Any) -> list[str]:
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_type(schema: DictConfig, key: str) -> Any:
    """The annotated type of a dotted key of the schema (``str``, ``list[str]``, a dataclass,
    ...), or None when the schema has no such field."""
    hint: Any = OmegaConf.get_type(schema)
    for part in key.split("."):
        if not (isinstance(hint, type) and is_dataclass(hint)):
            return None
        hint = _type_hints(hint).get(part)
        if hint is None:
            return None
    return hint


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) is list


def _is_str_list(hint: Any) -> bool:
    return typing.get_origin(hint) is list and typing.get_args(hint) == (str,)


def _type_name(hint: Any) -> str:
    """What a value of the annotated type is, as an error says it."""
    if hint is bool:
        return "true or false"
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {getattr(item, '__name__', str(item))}"
    return getattr(hint, "__name__", "")


def _unknown_key_error(schema: DictConfig, full_key: str, source: str) -> ConfigError:
    parent_key, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    valid = _valid_keys(parent)
    hint = difflib.get_close_matches(leaf, valid, n=1)
    where = f"under {parent_key!r}" if parent_key else "at the top level"
    in_file = "" if source == _COMMAND_LINE else f" in {source}"
    msg = f"unknown config key {full_key!r}{in_file}; valid keys {where}: {', '.join(valid)}"
    if hint:
        msg += f" (did you mean {(parent_key + '.' if parent_key else '') + hint[0]!r}?)"
    return ConfigError(msg)


def _section_value_error(
    schema: DictConfig, key: str, value: Any, source: str, choices: dict[str, tuple[str, ...]]
) -> ConfigError:
    """A section (a group of keys) given a single value: name it, its keys and what was meant."""
    section = OmegaConf.select(schema, key)
    keys = _valid_keys(section)
    first = str(next(iter(section), "KEY")) if isinstance(section, DictConfig) else "KEY"
    given = "no value (an empty section)" if value is None else f"the value {value!r}"
    msg = f"{key!r} is a section with keys {', '.join(keys)}; {source} gives it {given}"
    # A value that is one of the choices of a key of the section: that key was meant.
    meant = [k for k in keys if value is not None and str(value) in choices.get(f"{key}.{k}", ())]
    on_cli = source == _COMMAND_LINE
    if meant:
        fix = f"{key}.{meant[0]}={value}" if on_cli else f"{key}: {{{meant[0]}: {value}}}"
        msg += f" (did you mean {fix}?)"
    elif on_cli:
        msg += f"; set one of its keys, e.g. {key}.{first}=VALUE"
    else:
        msg += f"; give its keys as a mapping, e.g. {key}: {{{first}: VALUE}}"
    return ConfigError(msg)


def _check_sections(
    schema: DictConfig, loaded: DictConfig, source: str, choices: dict[str, tuple[str, ...]]
) -> None:
    """Raise when a preset gives a section (``method: byol``) a value instead of keys."""
    data = OmegaConf.to_container(loaded, resolve=False)

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for k, v in node.items():
            key = f"{prefix}{k}"
            if not isinstance(OmegaConf.select(schema, key, default=None), DictConfig):
                continue
            if not isinstance(v, dict):
                raise _section_value_error(schema, key, v, source, choices)
            walk(v, key + ".")

    walk(data, "")


def _expand_group_shorthand(
    schema: DictConfig, overrides: list[str], choices: dict[str, tuple[str, ...]]
) -> list[str]:
    """``method=byol`` means ``method.name=byol`` for sections whose ``name`` has a closed set
    of values (``choices``); any other section given a value is an error naming its keys."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = OmegaConf.select(schema, key, default=None) if key else None
        if isinstance(node, DictConfig) and not value.lstrip().startswith("{"):
            if f"{key}.name" not in choices:
                raise _section_value_error(schema, key, value, _COMMAND_LINE, choices)
            out.append(f"{key}.name={value}")
        else:
            out.append(item)
    return out


def _unquote(text: str) -> str:
    """``'a b'`` / ``"a b"`` (quotes that reached us through the shell) -> ``a b``; any other
    text is kept exactly as written."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if isinstance(value, str):
            return value
    return text


def _split_text_list(key: str, text: str) -> list[str]:
    """``[01, on, 'a,b']`` -> ``['01', 'on', 'a,b']``: each element's own text (unquoted)."""
    inner = text.strip()[1:-1]
    items: list[str] = []
    buf: list[str] = []
    quote = ""
    escaped = False
    for ch in inner:
        if quote:
            buf.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"" and not "".join(buf).strip():
            quote = ch
            buf.append(ch)
        elif ch == ",":
            items.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if quote:
        raise ConfigError(f"unterminated quote in the list {text!r} given to {key!r}")
    items.append("".join(buf))
    if not items[-1].strip():  # [] and a trailing comma, as YAML reads them
        items.pop()
    if any(not item.strip() for item in items):
        raise ConfigError(f"an empty element in the list {text!r} given to {key!r}")
    for item in items:
        word = item.strip()
        quoted = word[:1] in "'\""
        # Text after a closing quote, or a bracket left over ([a]]): quote such an element.
        if (quoted and _unquote(word) == word) or (not quoted and any(c in word for c in "[]")):
            raise ConfigError(f"cannot parse the element {word} of the list given to {key!r}")
    return [_unquote(item.strip()) for item in items]


def _parse_override(schema: DictConfig, item: str) -> DictConfig:
    """One ``key=value`` into a config holding that key.

    Text keys take the value exactly as written (``encoder.run=007`` stays ``"007"``, not the
    YAML number 7; ``wandb.name=on`` stays ``"on"``, not true); quotes that got through the
    shell are removed (``key=''`` and ``key=`` give ``""``). Lists of text keep each element's
    text. Every other key is read as YAML (numbers, booleans, lists, ``{...}`` sections).
    """
    key, _, text = item.partition("=")
    hint = _field_type(schema, key)
    value: Any
    if hint is str:
        value = _unquote(text.strip())  # surrounding blanks are the command line's, not the text
    elif _is_str_list(hint) and text.strip().startswith("[") and text.strip().endswith("]"):
        value = _split_text_list(key, text)
    else:
        if _is_list(hint) and not text.strip().startswith(("[", "${")) and text.strip():
            raise ConfigError(f"{key!r} is {_type_name(hint)}: write {key}=[{text.strip()}]")
        if hint is not None and _unquote(text.strip()) == "":
            expected = _type_name(hint)
            how = (
                f"write {key}=[] for an empty list"
                if _is_list(hint)
                else "only text keys take an empty value"
            )
            raise ConfigError(
                f"empty value for {key!r} on the command line: expected {expected} ({how})"
            )
        try:
            return OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot parse override {item!r}: {err}") from None
    out = OmegaConf.create()
    try:
        OmegaConf.update(out, key, value, merge=True)
    except OmegaConfBaseException as err:  # e.g. a malformed ${...} interpolation
        raise ConfigError(f"cannot parse override {item!r}: {err}") from None
    return out


def _merge(base: DictConfig, other: DictConfig, schema: DictConfig, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
        assert isinstance(merged, DictConfig)
        return merged
    except (ConfigKeyError, ConfigAttributeError) as err:
        raise _unknown_key_error(schema, str(err.full_key), source) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        if key and _is_list(_field_type(schema, key)):
            given = OmegaConf.select(other, key, default=None, throw_on_missing=False)
            if not isinstance(given, (ListConfig, list)):
                wanted = _type_name(_field_type(schema, key))
                if given is None:
                    fix = "no value; write a list ([] for an empty one)"
                else:
                    fix = f"{format_value(given)}; write it as a list: [{format_value(given)}]"
                raise ConfigError(f"{key!r} is {wanted}, but {source} gives it {fix}") from None
        expected = _expected_type(schema, key) if key else ""
        what = f"invalid value for {key!r}" if key else "invalid value"
        raise ConfigError(
            f"{what} in {source}: {(err.msg or str(err)).splitlines()[0]}"
            + (f" (expected {expected})" if expected else "")
        ) from None


def _expected_type(schema: DictConfig, key: str) -> str:
    hint = _field_type(schema, key)
    if hint is not None and not is_dataclass(hint):
        return _type_name(hint)
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
        source = f"config file {str(path)!r}"
        _check_sections(base, loaded, source, job_choices(job))
        cfg = _merge(cfg, loaded, base, source=source)
    if overrides:
        for item in _expand_group_shorthand(base, overrides, job_choices(job)):
            cfg = _merge(cfg, _parse_override(base, item), base, source=_COMMAND_LINE)
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
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


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
