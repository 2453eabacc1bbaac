"""Every config key of a job with its value, its valid choices and what it means.

The meaning is the comment written above the field in the schema (``ssl_robust/config/*.py``),
so the schema stays the one place that documents a key; ``--help`` of every job script prints
this listing (``ssl_robust.cli``).
"""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import fields, is_dataclass
from functools import cache
from typing import Any

from omegaconf import DictConfig, ListConfig

from ssl_robust.config.common import COMMON_RANGES, Range

_FIELD = re.compile(r"^(\s+)(\w+)\s*:")
_WIDTH = 96
# The header of keys that belong to no section (the fine-tuning job's ``mode``).
_TOP_LEVEL = "top-level keys"


@cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment lines directly above each field of a dataclass, joined into one text.

    Fields inherited from a base dataclass keep the base's comment unless the subclass
    redeclares them.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (e.g. made at run time)
            continue
        own = set(getattr(klass, "__annotations__", {}))
        body_indent = None
        for i, line in enumerate(lines):
            m = _FIELD.match(line)
            if not m or m.group(2) not in own:
                continue
            body_indent = body_indent or m.group(1)
            if m.group(1) != body_indent:
                continue
            comment: list[str] = []
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#"):
                comment.insert(0, lines[j].strip().lstrip("#").strip())
                j -= 1
            if comment or m.group(2) not in out:
                out[m.group(2)] = " ".join(comment)
    return out


def _section_doc(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclass writes when there is none
        return ""
    return " ".join(doc.split())


def format_value(value: Any) -> str:
    """A compact YAML-like rendering: strings bare ("" when empty), lists in brackets."""
    if isinstance(value, (ListConfig, list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value and value.strip() == value else repr(value).replace("'", '"')
    return str(value)


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text, _WIDTH, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
    )


def describe(
    schema: type,
    cfg: DictConfig,
    choices: dict[str, tuple[str, ...]],
    prefix: str = "",
    ranges: dict[str, Range] | None = None,
) -> str:
    """One block per section: each key as ``key = value  {choices}`` and its comment below.

    Args:
        schema: the job's dataclass schema (for the comments).
        cfg: the config whose values are shown (schema defaults or a loaded config).
        choices: the closed value sets of the job's keys.
        prefix: only keys equal to it or below it (``optim``, ``data.name``); "" for all.
        ranges: the valid ranges of the job's numeric keys (default: the shared ones).

    Raises:
        KeyError: when no key matches ``prefix``.
    """
    ranges = COMMON_RANGES if ranges is None else ranges
    out: list[str] = []
    block = [""]  # the section whose header the keys printed last stand under ("": none yet)

    def matches(key: str) -> bool:
        return not prefix or key == prefix or key.startswith(prefix + ".")

    def walk(cls: type, node: DictConfig, path: str) -> None:
        comments = field_comments(cls)
        for f in fields(cls):  # type: ignore[arg-type]
            key = f"{path}{f.name}"
            value = node[f.name]
            default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
            if is_dataclass(default) and isinstance(value, DictConfig):
                if not matches(key) and not prefix.startswith(key + "."):
                    continue
                if matches(key):
                    out.append("")
                    out.append(f"{key}:")
                    about = (_section_doc(type(default)), comments.get(f.name, ""))
                    out.extend(_wrap(" ".join(t for t in about if t), "  "))
                    block[0] = key
                walk(type(default), value, key + ".")
                continue
            if not matches(key):
                continue
            # A key after a subsection (``mode`` after ``run:``) gets its own section's header,
            # so that it does not read as a key of the section above it.
            section = path.rstrip(".") or _TOP_LEVEL
            if block[0] != section:
                out.extend(["", f"{section}:"])
                block[0] = section
            line = f"  {key} = {format_value(value)}"
            if key in choices:
                line += "   {" + ", ".join(format_value(c) for c in choices[key]) + "}"
            elif key in ranges:
                line += f"   ({ranges[key][1]})"
            out.append(line)
            out.extend(_wrap(comments.get(f.name, ""), "      "))

    walk(schema, cfg, "")
    if not out:
        raise KeyError(prefix)
    return "\n".join(out).lstrip("\n")
