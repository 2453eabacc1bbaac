"""Compare runs side by side: gather run directories (or wandb runs), find the config keys that
differ, and write a table (Markdown + HTML) and comparison plots (PNG).

    from ssl_robust.compare import compare
    compare(["runs/"], "reports/compare")   # every run directory below runs/

A run directory is any folder with ``metrics.json`` (training phases) or ``report.json``
(evaluation) next to its ``config.yaml``. Run directories name their inputs by path
(``encoder.run``, ``classifier.run``, ``denoiser.run``, ...); keys of those upstream configs
that a run does not set itself are filled in from them, so an evaluation run still knows its
method and label fraction. Those filled-in keys hide an upstream setting that the run sets
too (a fine-tuning's own ``trainer.max_epochs`` hides its encoder's); the settings of every
upstream run are therefore also kept apart, each under the sections that lead to it
(``encoder>trainer.max_epochs``, :func:`upstream_settings`), for telling replicates apart.

The pages name each run by its folder (as many trailing components as tell the runs apart:
``baseline/a`` beside ``finetune/a``), show accuracies and rates in % (the unit in each
column heading) and end with the plots; the plots label each run by the fewest settings
that tell it apart (``encoder=none, fraction=0.1, purifier=set, seed=1``), in a legend
beside the axes, a distinct colour per run.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from omegaconf import OmegaConf

from ssl_robust.config.common import RUN_ONLY_KEYS
from ssl_robust.files import write_text_atomic
from ssl_robust.launch.curves import read_history
from ssl_robust.plotting import pyplot, save_figure

# Config keys that name a run and never explain a difference between results.
IGNORED_KEYS = ("run.dir", "run.resume", "wandb.", *sorted(RUN_ONLY_KEYS))
# Sections a setting switches off: their keys did not act in that run.
_INACTIVE_WHEN = {
    ("mode", "linear"): ("augment.", "optim.encoder_lr_mult"),  # a probe on frozen features
    ("mode", "full"): ("linear.",),
}
# Validation metrics drawn against epochs for the training runs: pretraining's kNN accuracy,
# fine-tuning's accuracy, a denoiser's loss.
CURVE_METRICS = ("val/knn_acc", "val/acc", "val/loss")
# The metrics shown by default when present: the hierarchical names every phase writes.
DEFAULT_METRICS = (
    "val/knn_acc",
    "val/knn_acc_shift",
    "val/acc_shift",
    "test/acc",
    "test/acc_purified",
    "shift/mean_acc",
    "shift/effective_robustness",
    "shift/mce",
    "adv/linf_8/acc",
    "adv/l2_0.5/acc",
    "cert/radius/0.5/acc",
    "calib/clean/ece",
    "ood/mean/msp/auroc",
    "ood/mean/knn/auroc",
    "repr/shift/knn_acc",
    "purify/nfe",
    "perf/purifier_nfe",
    "val/loss",
)
# Denoiser evaluations per purified image: an evaluation's (written by its perf section) and a
# fine-tuning's (its purified test pass). Only evaluations are attacked: the robust accuracy is
# drawn against the first.
NFE_METRICS = ("perf/purifier_nfe", "purify/nfe")
# Joins the sections that lead to an upstream run to one of its settings:
# ``encoder>trainer.max_epochs`` is the ``trainer.max_epochs`` of the run ``encoder.run`` names,
# ``classifier>encoder>method.name`` one step further up.
UPSTREAM_SEP = ">"


@dataclass
class Run:
    """One run: where it came from, its flattened config and its numeric metrics.

    Attributes:
        name: Run directory name (or wandb run name).
        source: The run directory or ``wandb:<entity>/<project>/<id>``.
        config: Dotted keys (``subset.fraction``) to values, upstream keys filled in.
        metrics: Hierarchical metric names (``shift/mean_acc``) to floats.
        data: The data an evaluation ran on (:func:`data_label`), "" when unknown.
        upstream: The settings of the runs it builds on (:func:`upstream_settings`), read when
            the run directory was loaded; None: read from ``config``'s paths when needed.
    """

    name: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    data: str = ""
    upstream: dict[str, Any] | None = None


def flatten(tree: Any, sep: str, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a<sep>b": leaf}``; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        out.update(flatten(value, sep, name) if isinstance(value, dict) else {name: value})
    return out


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _read_config(folder: Path) -> dict[str, Any]:
    """A run directory's ``config.yaml``, flattened; ``data.image_size`` 0 (the dataset's own
    size) replaced by the size the run used where its files say (:func:`effective_image_size`),
    so that a run at the native size and one that asked for that size are alike."""
    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    config = flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=True), ".")
    size = config.get("data.image_size")
    if size == 0 and not isinstance(size, bool):
        used = effective_image_size(folder)
        if used:
            config["data.image_size"] = used
    return config


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def effective_image_size(folder: Path) -> int | None:
    """The image size a run worked at, from the files it wrote: an evaluation's
    ``report.json`` (``meta.data_config``), a fine-tuning's ``classifier.json`` (``data``), a
    pretraining's ``encoder.json``, a denoiser's ``unet/config.json`` (``sample_size``); None
    when none of them says."""
    report = _read_json(folder / "report.json")
    meta = report.get("meta") if isinstance(report, dict) else None
    classifier = _read_json(folder / "classifier.json")
    encoder = _read_json(folder / "encoder.json")
    unet = _read_json(folder / "unet" / "config.json")
    found = (
        (meta.get("data_config") if isinstance(meta, dict) else None, "image_size"),
        (classifier.get("data") if isinstance(classifier, dict) else None, "image_size"),
        (encoder, "image_size"),
        (unet, "sample_size"),
    )
    for source, key in found:
        value = source.get(key) if isinstance(source, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def data_label(config: Mapping[str, Any]) -> str:
    """What an evaluation ran on, from its report's ``meta.data_config``: ``<name> at <size>
    px``."""
    return f"{config.get('name', '')} at {config.get('image_size', '?')} px"


def load_run(folder: str | Path, follow_upstream: bool = True) -> Run:
    """A run directory: ``config.yaml`` and ``metrics.json`` and/or ``report.json``.

    Raises:
        FileNotFoundError: If the folder holds neither ``metrics.json`` nor ``report.json``.
    """
    folder = Path(folder)
    files = [folder / "metrics.json", folder / "report.json"]
    if not any(p.is_file() for p in files):
        raise FileNotFoundError(f"{folder} holds neither metrics.json nor report.json")
    metrics: dict[str, float] = {}
    data = ""
    for path in files:
        if path.is_file():
            content = json.loads(path.read_text())
            # An evaluation's report.json keeps its numbers under "metrics" (beside meta, per-class
            # tables, histograms: not metrics); another may nest sections. Names are '/'-joined.
            numbers = content.get("metrics") if isinstance(content, dict) else None
            metrics.update(
                _numeric(flatten(numbers if isinstance(numbers, dict) else content, "/"))
            )
            meta = content.get("meta") if isinstance(content, dict) else None
            if isinstance(meta, dict) and meta.get("data_config"):
                data = data_label(meta["data_config"])
    config = _read_config(folder)
    upstream = None
    if follow_upstream:
        # From the run's own paths: a path it inherits is relative to another folder.
        upstream = upstream_settings(config, folder)
        config = _with_upstream(config, folder, seen={folder.resolve()})
    return Run(
        name=folder.name,
        source=str(folder),
        config=config,
        metrics=metrics,
        data=data,
        upstream=upstream,
    )


def upstream_dir(value: str, folder: Path) -> Path:
    """The run directory a run in ``folder`` names by ``value``: as given, or relative to
    ``folder`` when it is not a directory from here."""
    path = Path(value)
    return folder / value if not path.is_absolute() and not path.is_dir() else path


def _with_upstream(config: dict[str, Any], folder: Path, seen: set[Path]) -> dict[str, Any]:
    """Fill keys this run does not set from the configs of the runs it names by path."""
    merged = dict(config)
    for key, value in config.items():
        if not (key.endswith(".run") and isinstance(value, str) and value):
            continue
        upstream = upstream_dir(value, folder)
        if not upstream.is_dir() or upstream.resolve() in seen:
            continue
        seen.add(upstream.resolve())
        inherited = _with_upstream(_read_config(upstream), upstream, seen)
        for k, v in inherited.items():
            if not k.startswith("run.") and k not in merged:
                merged[k] = v
    return merged


def _is_ignored(key: str, ignore: Sequence[str] = IGNORED_KEYS) -> bool:
    return any(key == i or (i.endswith(".") and key.startswith(i)) for i in ignore)


def upstream_settings(
    config: Mapping[str, Any], folder: Path, prefix: str = "", seen: frozenset[Path] = frozenset()
) -> dict[str, Any]:
    """The settings of the runs that a run (in ``folder``, with its own ``config``) names by
    path (:func:`_is_upstream`), recursively: each key of an upstream run's config under the
    sections that lead to it (``encoder>trainer.max_epochs``, ``classifier>encoder>method.name``;
    :data:`UPSTREAM_SEP`), without its ``run.*`` keys (its seed: seed variation upstream is seed
    variation), its paths, :data:`IGNORED_KEYS` (where its data and caches lie) and the
    sections it switched off; of a ``data.like`` run, only its ``data.*`` keys. Each path key
    itself (``classifier.run``, ``classifier>encoder.run``) stands for whether it is set: True
    for a readable run, "" for none, and the path itself for a run that cannot be read here
    (runs copied from elsewhere: their settings cannot be compared, so only the same run is
    alike)."""
    seen = seen | {folder.resolve()}
    out: dict[str, Any] = {}
    for key, value in sorted(config.items()):
        if not _is_upstream(key) or not isinstance(value, str):
            continue
        upstream = upstream_dir(value, folder) if value else None
        if upstream is None or not (upstream / "config.yaml").is_file():
            out[prefix + key] = value
            continue
        out[prefix + key] = True
        if upstream.resolve() in seen:  # a cycle: its settings are already there
            continue
        own = _read_config(upstream)
        name = prefix + key.removesuffix(".run") + UPSTREAM_SEP
        data_only = key == "data.like"  # whose data and split: its other settings never acted
        for k, v in _active_config(Run("", "", own)).items():
            if data_only and not k.startswith("data."):
                continue
            if not (k.startswith("run.") or _is_seed(k) or _is_upstream(k) or _is_ignored(k)):
                out[name + k] = v
        if not data_only:
            out.update(upstream_settings(own, upstream, name, seen))
    return out


def _upstream_of(run: Run) -> dict[str, Any]:
    """``run.upstream``, or (a run not loaded from its directory) read from its config's
    paths."""
    if run.upstream is not None:
        return run.upstream
    return upstream_settings(run.config, Path(run.source))


def _differing(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys that take different values in the mappings that have them."""
    out = []
    for key in sorted({k for c in settings for k in c}):
        values = {json.dumps(c[key], sort_keys=True, default=str) for c in settings if key in c}
        if len(values) > 1:
            out.append(key)
    return out


def upstream_keys(runs: Sequence[Run], shown: bool = True) -> list[str]:
    """Keys of the runs' upstream settings (:func:`upstream_settings`) that take different
    values in the runs that have them; ``shown``: less those that the runs' own (filled-in)
    config tells apart as well (``classifier>subset.fraction`` beside the ``subset.fraction``
    a run inherited unchanged), which say nothing more."""
    settings = [_upstream_of(r) for r in runs]
    keys = _differing(settings)
    if not shown:
        return keys

    def repeated(key: str) -> bool:
        own = key.rpartition(UPSTREAM_SEP)[2]
        return bool(UPSTREAM_SEP in key) and all(
            own in r.config
            and json.dumps(r.config[own], default=str) == json.dumps(s[key], default=str)
            for r, s in zip(runs, settings, strict=True)
            if key in s
        )

    return [k for k in keys if not repeated(k)]


def find_runs(roots: Iterable[str | Path]) -> list[Run]:
    """Every run directory at or below each root (sorted by path)."""
    found: dict[Path, Run] = {}
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        candidates = {
            p.parent for name in ("metrics.json", "report.json") for p in root.rglob(name)
        }
        for folder in sorted(candidates):
            # Files below a run's own output (wandb/, logs/) are not runs of their own.
            if any(parent in candidates for parent in folder.parents):
                continue
            found.setdefault(folder.resolve(), load_run(folder))
    return [found[k] for k in sorted(found)]


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else as it is."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def unfinished_runs(roots: Iterable[str | Path]) -> list[Path]:
    """Run directories at or below each root that have no results yet (sorted by path): a
    ``config.yaml`` but neither ``metrics.json`` nor ``report.json``, as a job that is still
    running, or was stopped before its end, leaves them. Folders below a run directory
    (``wandb/``'s copies of the config) are not runs of their own."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if not root.exists():
            continue
        configs = {p.parent for p in root.rglob("config.yaml")}
        for folder in configs:
            if any(parent in configs for parent in folder.parents):
                continue
            if not any((folder / name).is_file() for name in ("metrics.json", "report.json")):
                found.add(folder.resolve())
    return sorted(found)


def wandb_runs(project: str, entity: str = "", filters: dict[str, Any] | None = None) -> list[Run]:
    """Runs of a wandb project through the public API (needs network and a login).

    ``filters`` is passed to ``wandb.Api().runs`` (e.g. ``{"group": "c10-sweep"}``).
    """
    import wandb

    path = f"{entity}/{project}" if entity else project
    runs = []
    for r in wandb.Api().runs(path, filters=filters or {}):
        config = flatten({k: v for k, v in r.config.items() if not k.startswith("_")}, ".")
        metrics = _numeric({k: v for k, v in r.summary.items() if "/" in k})
        runs.append(Run(name=r.name, source=f"wandb:{path}/{r.id}", config=config, metrics=metrics))
    return runs


def _active_config(run: Run) -> dict[str, Any]:
    """The run's config without the settings of sections it switched off: a section with a
    ``run`` key set to "" (no purifier, no denoised views) ignores its other keys, and a linear
    probe its full fine-tuning settings (and the reverse). The encoder section is the
    exception: without a run its backbone is trained from random weights, and with one its
    width is ignored."""
    off = {
        key.removesuffix("run")
        for key, value in run.config.items()
        if key.endswith(".run") and value == "" and key != "encoder.run"
    }
    # A fine-tuning's encoder: a pretrained run's (encoder.backbone "", so that a baseline's
    # backbone shows beside it), or (no run) a backbone from random weights.
    if run.config.get("encoder.run"):
        off.add("encoder.width")
    for (key, value), prefixes in _INACTIVE_WHEN.items():
        if run.config.get(key) == value:
            off.update(prefixes)
    return {
        k: v
        for k, v in run.config.items()
        if k.endswith(".run") or not any(k.startswith(prefix) for prefix in off)
    }


def differing_keys(runs: Sequence[Run], ignore: Sequence[str] = IGNORED_KEYS) -> list[str]:
    """Config keys that take different values in the runs that have them.

    A key some runs lack (their upstream run holds no such setting, or the section is switched
    off: ``purifier.ddim_steps`` of an evaluation without a purifier) explains nothing: the key
    that switched it off (``purifier.run``) already differs.
    """
    configs = [_active_config(r) for r in runs]
    return [k for k in _differing(configs) if not _is_ignored(k, ignore)]


# The phases in pipeline order; a run's phase is told by a config key only that phase has
# (upstream keys are merged in, so the most downstream marker wins).
JOBS = ("pretrain", "denoiser", "finetune", "evaluate")
_JOB_MARKERS = (
    ("classifier.run", "evaluate"),
    ("encoder.run", "finetune"),
    ("method.name", "pretrain"),
    ("denoiser.unet", "denoiser"),
)
# A phase whose legend labels run longer names its runs by their folders (:func:`display_names`)
# when those are shorter.
_MAX_LABEL = 52
# The settings a label names first, when several tell the same runs apart (a fine-tuning's
# encoder.run beside its mode, optimiser and trainer settings that come with it): by their own
# key, whichever run they belong to.
_HEADLINE_KEYS = (
    "method.name",
    "encoder.run",
    "mode",
    "subset.fraction",
    "subset.per_class",
    "purifier.run",
    "purify.run",
    "purifier.sampler",
    "purify.sampler",
    "purifier.t_star",
    "purify.t_star",
    "purifier.ddim_steps",
    "purify.ddim_steps",
    "encoder.backbone",
)


def job_of(run: Run) -> str:
    """The phase that wrote ``run`` (one of :data:`JOBS`), or ``"other"``."""
    return next((job for key, job in _JOB_MARKERS if key in run.config), "other")


def by_job(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by phase, in pipeline order: config keys compare only within a phase."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(job_of(run), []).append(run)
    order = [*JOBS, "other"]
    return {job: groups[job] for job in order if job in groups}


def _natural(text: str) -> list[tuple[int, float, str]]:
    """Sort key that puts numbers in their order (``t_star=20`` before ``t_star=100``)."""
    out = []
    for part in re.split(r"(\d+(?:\.\d+)?)", text):
        try:
            out.append((0, float(part), ""))
        except ValueError:
            out.append((1, 0.0, part))
    return out


def display_names(runs: Sequence[Run]) -> dict[str, str]:
    """A name per run (by ``source``) for a table or a legend: the last components of its
    folder, as many for every run as tell them all apart (``finetune/a`` beside
    ``baseline/a``; the folder's name alone when that is unique); a wandb run by its name."""
    parts: dict[str, tuple[str, ...]] = {}
    for run in runs:
        if run.source.startswith("wandb:"):
            parts[run.source] = (run.name,)
        else:
            parts[run.source] = (*Path(run.source).parts[:-1], run.name)
    depth = max((len(p) for p in parts.values()), default=1)
    for k in range(1, depth + 1):
        tails = ["/".join(p[-k:]) for p in parts.values()]
        if len(set(tails)) == len(tails):
            return {source: "/".join(p[-k:]) for source, p in parts.items()}
    # Runs named alike that no folder tells apart (wandb runs): their source says which.
    names = {source: "/".join(p) for source, p in parts.items()}
    counts = {n: list(names.values()).count(n) for n in names.values()}
    return {s: n if counts[n] == 1 else f"{n} ({s})" for s, n in names.items()}


def _short_key(key: str) -> str:
    """A setting as a label names it: ``<section>.run`` and ``<section>.name`` as the
    section (``encoder=none``, ``method=byol``, as on the command line), a seed as ``seed``,
    another key by its last part, an upstream run's setting after the run it belongs to
    (``encoder>max_epochs``)."""
    hops = key.split(UPSTREAM_SEP)
    own = hops[-1]
    section, _, last = own.rpartition(".")
    if own == "data.like":
        return own
    if section and last == "run":
        return section.rsplit(".", 1)[-1]
    if _is_seed(own):
        return "seed" if own == "run.seed" else own
    head = hops[-2] + UPSTREAM_SEP if len(hops) > 1 else ""
    return head + (section.rsplit(".", 1)[-1] if section and last == "name" else last)


def _label_value(key: str, value: Any) -> str:
    """A setting's value as a label shows it: another run by its folder's name, or by
    whether it is set (``set`` / ``none``, as the tables over replicates show it)."""
    if _is_upstream(key.rpartition(UPSTREAM_SEP)[2]):
        if value is True:
            return "set"
        if isinstance(value, str) and value:
            return Path(value).name
        return "none"
    return _fmt(value)


def _label_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key's :func:`_short_key`, or its full key where two of ``keys`` would read alike."""
    short = {k: _short_key(k) for k in keys}
    counts = {n: list(short.values()).count(n) for n in short.values()}
    return {k: n if counts[n] == 1 else k for k, n in short.items()}


def _telling_keys(rows: Sequence[Mapping[str, str]], keys: Sequence[str]) -> list[str]:
    """The fewest of ``keys``, taken in their order, that tell apart the ``rows`` that differ
    anywhere in ``keys``: each kept only when it splits rows the ones before it leave
    together (so of settings that always change together, such as a baseline's backbone
    and optimiser beside a probe's, only the first is named)."""

    def parts(chosen: Sequence[str]) -> int:
        return len({tuple(row.get(k) for k in chosen) for row in rows})

    target = parts(keys)
    chosen: list[str] = []
    for key in keys:
        if parts(chosen) == target:
            break
        if parts([*chosen, key]) > parts(chosen):
            chosen.append(key)
    return chosen


def _by_priority(keys: Iterable[str]) -> list[str]:
    """``keys`` with those of :data:`_HEADLINE_KEYS` first (a run's own before an upstream
    run's), the others in their order."""

    def rank(key: str) -> tuple[int, int]:
        own = key.rpartition(UPSTREAM_SEP)[2]
        at = _HEADLINE_KEYS.index(own) if own in _HEADLINE_KEYS else len(_HEADLINE_KEYS)
        return at, key.count(UPSTREAM_SEP)

    return sorted(keys, key=rank)


def chain_seeds(run: Run) -> dict[str, Any]:
    """The seeds of ``run`` and of the runs it builds on (``classifier>run.seed``, the seed of
    the fine-tuning an evaluation scores), read from their run directories: what tells
    replicates apart."""
    out = {k: v for k, v in run.config.items() if _is_seed(k)}
    folder = Path(run.source)
    if run.source.startswith("wandb:") or not folder.is_dir():
        return out

    def walk(config: Mapping[str, Any], here: Path, prefix: str, seen: frozenset[Path]) -> None:
        for key, value in sorted(config.items()):
            if not key.endswith(".run") or not isinstance(value, str) or not value:
                continue
            upstream = upstream_dir(value, here)
            if not (upstream / "config.yaml").is_file() or upstream.resolve() in seen:
                continue
            own = _read_config(upstream)
            name = prefix + key.removesuffix(".run") + UPSTREAM_SEP
            out.update({name + k: v for k, v in own.items() if _is_seed(k)})
            walk(own, upstream, name, seen | {upstream.resolve()})

    walk(_read_config(folder) or run.config, folder, "", frozenset({folder.resolve()}))
    return out


def _phase_labels(runs: Sequence[Run]) -> dict[str, str]:
    """:func:`run_labels` of the runs of one phase."""
    unique = list({r.source: r for r in runs}.values())
    names = display_names(unique)
    if len(unique) == 1:
        return names
    series = _by_priority(line_series(unique, differing_keys(unique)))
    rows: dict[str, dict[str, str]] = {}
    seed_keys: list[str] = []
    for run in unique:
        upstream = _upstream_of(run) if any(map(_is_upstream_setting, series)) else {}
        active = _active_config(run)
        row = {}
        for key in series:
            where = upstream if _is_upstream_setting(key) else active
            if key in where:
                row[key] = _label_value(key, where[key])
        seeds = chain_seeds(run)
        seed_keys += [
            k for k in sorted(seeds, key=lambda k: k.count(UPSTREAM_SEP)) if k not in seed_keys
        ]
        rows[run.source] = row | {k: _fmt(v) for k, v in seeds.items()}
    chosen = _telling_keys(list(rows.values()), [*series, *seed_keys])
    shown = _label_names(chosen)
    labels = {
        source: ", ".join(f"{shown[k]}={row[k]}" for k in chosen if k in row)
        for source, row in rows.items()
    }
    if any(len(label) > _MAX_LABEL for label in labels.values()) and max(
        map(len, names.values())
    ) < max(map(len, labels.values())):
        return names  # one form for the whole legend
    counts = {label: list(labels.values()).count(label) for label in labels.values()}
    # A run that no setting or seed tells apart (a rerun) is named by its folder.
    return {s: names[s] if not label or counts[label] > 1 else label for s, label in labels.items()}


def run_labels(runs: Sequence[Run]) -> dict[str, str]:
    """A short legend label per run (by ``source``), unique within its phase: the fewest of the
    settings that differ within the phase that tell its runs apart, in ``key=value`` form
    (:func:`_telling_keys`; the settings of the runs each builds on included, an upstream run
    by whether it is set), then the seed that tells replicates apart (``seed=1``: its own or
    that of the run it builds on, :func:`chain_seeds`); the run's name
    (:func:`display_names`) when that says nothing, is shorter than a label over
    :data:`_MAX_LABEL` characters or would not be unique. The full settings are in the
    tables."""
    labels = {}
    for members in by_job(runs).values():
        labels.update(_phase_labels(members))
    return labels


def select_metrics(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> list[str]:
    """The metric columns: those asked for, else the default ones present in any run (and the
    accuracy on every natural-shift set, with its effective robustness where computed, after
    the clean accuracy)."""
    present = {k for r in runs for k in r.metrics}
    if metrics:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise ValueError(f"no run has metric(s) {missing}; available: {sorted(present)}")
        return list(metrics)
    chosen = [m for m in DEFAULT_METRICS if m in present]
    # Natural-shift sets are named by the user: each one's accuracy, after the clean one's.
    natural = []
    for acc in sorted(m for m in present if m.startswith("natural/") and m.endswith("/acc")):
        er = acc.removesuffix("/acc") + "/effective_robustness"
        natural += [acc, er] if er in present else [acc]
    if natural:
        at = chosen.index("test/acc") + 1 if "test/acc" in chosen else 0
        chosen[at:at] = natural
    return chosen or sorted(present)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if value == "":
        return "none"  # e.g. purifier.run of an evaluation without a purifier
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Accuracies and rates (an AUROC, a false-positive rate) are shown in %, as the evaluation
# reports show them; effective robustness, a difference of accuracies, in percentage points.
_PERCENT = re.compile(r"(^|_)(acc|auroc|aupr|fpr\d*)(_|$)")


def metric_unit(metric: str) -> str:
    """How a metric is shown: ``"%"`` (an accuracy or a rate, times 100), ``"pp"``
    (effective robustness, in percentage points) or ``""`` (as it is: an ECE, a loss, an
    mCE, a count)."""
    last = metric.rsplit("/", 1)[-1]
    if last.endswith("effective_robustness"):
        return "pp"
    return "%" if _PERCENT.search(last) else ""


def metric_header(metric: str) -> str:
    """A metric's column heading, its unit after it: ``test/acc (%)``."""
    unit = metric_unit(metric)
    return f"{metric} ({unit})" if unit else metric


def format_metric(metric: str, value: float | None) -> str:
    """A metric's value in its unit (:func:`metric_unit`): ``91.64`` for an accuracy of
    0.9164, two decimals as the evaluation reports; others as :func:`_fmt`."""
    if value is None or not metric_unit(metric):
        return _fmt(value)
    return f"{100 * value:.2f}"


UNITS_NOTE = (
    "Units: accuracies and rates (AUROC, FPR) in % (column headings say so), as in the "
    "evaluation reports; effective robustness in percentage points (pp); ECE, losses, "
    "corruption errors (CE, mCE) and counts as they are."
)


def ordered_runs(
    runs: Sequence[Run], keys: Sequence[str], active: Mapping[str, dict[str, Any]] | None = None
) -> list[Run]:
    """The runs in the order of their table: by the differing keys' values, then by name."""
    active = active or {r.source: _active_config(r) for r in runs}
    names = display_names(runs)
    return sorted(
        runs, key=lambda r: [_fmt(active[r.source].get(k)) for k in keys] + [names[r.source]]
    )


def run_link(run: Run, out: Path) -> str | None:
    """Where a run's name points from a comparison in ``out``: its report (an evaluation), its
    curves (a training run) or its folder, relative to ``out``; None for a wandb run."""
    folder = Path(run.source)
    if run.source.startswith("wandb:") or not folder.is_dir():
        return None
    target = next(
        (folder / f for f in ("report.md", "curves.png") if (folder / f).is_file()), folder
    )
    return os.path.relpath(target.resolve(), out.resolve())


def table(
    runs: Sequence[Run], keys: Sequence[str], metrics: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings), runs sorted by the differing keys (:func:`ordered_runs`) and
    named by :func:`display_names`; metrics in their unit (:func:`format_metric`, the unit in
    the heading)."""

    # Here, not at the top: the evaluate package imports torch, which a comparison of finished
    # runs needs only for this interval.
    from ssl_robust.evaluate.metrics import accuracy_interval

    def metric(run: Run, name: str) -> str:
        value = run.metrics.get(name)
        bounds = accuracy_interval(run.metrics, name)
        shown = format_metric(name, value)
        if value is None or bounds is None:
            return shown
        if metric_unit(name):
            return f"{shown} [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"
        return f"{shown} [{bounds[0]:.3f}, {bounds[1]:.3f}]"

    # A switched-off section's settings show as missing: they did not act.
    active = {r.source: _active_config(r) for r in runs}
    ordered = ordered_runs(runs, keys, active)
    # Upstream runs by the end of their paths that tells them apart (the full paths are long
    # and share their start).
    short = {
        k: short_paths([str(c[k]) for c in active.values() if c.get(k)])
        for k in keys
        if _is_upstream(k)
    }

    def setting(run: Run, key: str) -> str:
        value = active[run.source].get(key)
        if key in short and value:
            return short[key][str(value)]
        return _fmt(value)

    names = display_names(runs)
    header = ["run", *keys, *map(metric_header, metrics)]
    rows = [
        [names[r.source], *(setting(r, k) for k in keys), *(metric(r, m) for m in metrics)]
        for r in ordered
    ]
    return header, rows


def short_paths(paths: Sequence[str]) -> dict[str, str]:
    """Each path by its fewest last components that no other of ``paths`` ends with
    (``/x/runs/finetune/a`` -> ``a``, or ``finetune/a`` beside ``/x/baseline/a``)."""
    parts = {p: Path(p).parts for p in set(paths)}
    out = {}
    for path, own in parts.items():
        for k in range(1, len(own) + 1):
            tail = own[-k:]
            if not any(other[-k:] == tail for q, other in parts.items() if q != path):
                out[path] = str(Path(*tail))
                break
        else:
            out[path] = path
    return out


def _is_upstream(key: str) -> bool:
    """A key naming another run directory (``classifier.run``; ``data.like``: whose data)."""
    return key.endswith(".run") or key == "data.like"


# Seeds besides run.seed: of a fine-tuning's purifier noise, of its data split, of a
# denoiser's sample grids. Runs apart only in seeds are replicates.
_OTHER_SEEDS = ("purify.seed", "data.split_seed", "samples.seed")


def _is_seed(key: str) -> bool:
    return key == "run.seed" or key in _OTHER_SEEDS


def _is_seed_or_path(key: str) -> bool:
    return _is_seed(key) or _is_upstream(key)


def replicate_groups(
    runs: Sequence[Run], keys: Sequence[str]
) -> list[tuple[dict[str, Any], list[Run]]]:
    """Runs of one setting: runs that differ only in seeds (``run.seed``, and the purifier's,
    the split's and the sample grids' seeds) and in which runs they build
    on, where those runs' settings match too, recursively (:func:`upstream_settings`: whether
    each is set, and all but their seeds and paths), so that fine-tunings of encoders
    pretrained for 100 and for 800 epochs stay apart while those of replicate encoders (seeds
    alone apart) are replicates too. An upstream run that cannot be read here counts by its
    path.

    Returns:
        Each setting with its runs, sorted by the setting: the values of the other differing
        ``keys`` and of the upstream settings that tell the groups apart (:func:`upstream_keys`,
        e.g. ``encoder>trainer.max_epochs``).
    """
    setting = [k for k in keys if not _is_seed_or_path(k)]
    upstream = {r.source: _upstream_of(r) for r in runs}
    compared = upstream_keys(runs, shown=False)
    shown = upstream_keys(runs)
    groups: dict[str, tuple[dict[str, Any], list[Run]]] = {}
    for run in runs:
        active = _active_config(run)
        own = upstream[run.source]
        values = {k: active.get(k) for k in setting} | {k: own.get(k) for k in shown}
        signature = [values, {k: own.get(k) for k in compared}]
        key = json.dumps(signature, sort_keys=True, default=str)
        groups.setdefault(key, (values, []))[1].append(run)
    order = sorted(
        groups, key=lambda g: [_fmt_setting(k, v) for k, v in groups[g][0].items()] + [g]
    )
    return [groups[g] for g in order]


def _fmt_setting(key: str, value: Any) -> str:
    """A setting of a replicate group: an upstream run (its own or one further up:
    ``classifier>data.like``) by whether it is set."""
    if _is_upstream(key.rpartition(UPSTREAM_SEP)[2]) and value is True:
        return "set"
    return _fmt(value)


def replicate_table(
    runs: Sequence[Run], keys: Sequence[str], metrics: Sequence[str]
) -> tuple[list[str], list[list[str]]] | None:
    """One row per setting (:func:`replicate_groups`): each metric's mean +- sample standard
    deviation over its runs; None when no setting has more than one run."""
    groups = replicate_groups(runs, keys)
    if all(len(members) == 1 for _, members in groups):
        return None
    setting = list(groups[0][0])
    header = [*setting, "runs", *map(metric_header, metrics)]
    rows = []
    for values, members in groups:
        row = [_fmt_setting(k, values[k]) for k in setting] + [str(len(members))]
        for metric in metrics:
            found = [r.metrics[metric] for r in members if metric in r.metrics]
            if not found:
                row.append(_fmt(None))
            elif len(found) == 1:
                row.append(
                    format_metric(metric, found[0]) + (" (1 run)" if len(members) > 1 else "")
                )
            else:
                mean, std = float(np.mean(found)), float(np.std(found, ddof=1))
                if metric_unit(metric):
                    cell = f"{100 * mean:.2f} ± {100 * std:.2f}"
                else:
                    cell = f"{mean:.4g} ± {std:.2g}"
                row.append(cell + (f" ({len(found)} runs)" if len(found) < len(members) else ""))
        rows.append(row)
    return header, rows


REPLICATES_NOTE = (
    "Over replicates: runs that differ only in run.seed and in which runs they build on, "
    "where those runs differ only in their seeds too, one row per setting (a setting of an "
    "upstream run as <section>>key: encoder>trainer.max_epochs); each metric as mean ± sample "
    "standard deviation over its runs."
)


CI_NOTE = (
    "[low, high]: the 95% interval (in the value's unit) over the images an accuracy was "
    "measured on (Wilson; for "
    "the corruption means, +-1.96 standard errors of each image's accuracy over the grid; for "
    "an ECE or AUROC, the bootstrap interval the evaluation recorded)."
)


def to_markdown(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    links: Sequence[str | None] | None = None,
) -> str:
    """A Markdown table; ``links[i]``, when given, makes row i's first cell a link."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def first(i: int, text: str) -> str:
        link = links[i] if links else None
        return f"[{cell(text)}]({quote(link)})" if link else cell(text)

    lines = [
        "| " + " | ".join(map(cell, header)) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    lines += [
        "| " + " | ".join([first(i, row[0]), *map(cell, row[1:])]) + " |"
        for i, row in enumerate(rows)
    ]
    return "\n".join(lines) + "\n"


def to_html(
    sections: Sequence[tuple[str | None, Sequence[str], Sequence[Sequence[str]]]],
    title: str,
    note: str | Sequence[str] = "",
    links: Sequence[Sequence[str | None]] | None = None,
    plots: Sequence[tuple[str, str]] = (),
    intro: Sequence[str] = (),
) -> str:
    """A page with the ``intro`` paragraphs, one table per ``(heading or None, header, rows)``
    section, the notes (one paragraph each) and a Plots section showing each ``(file,
    caption)`` of ``plots`` (files beside the page); ``links[s][i]``, when given, makes row i's
    first cell of section s a link."""
    body = [f"<p>{html.escape(line)}</p>\n" for line in intro]
    for s, (heading, header, rows) in enumerate(sections):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)

        def first(i: int, text: str, s: int = s) -> str:
            link = links[s][i] if links else None
            if not link:
                return html.escape(text)
            return f"<a href='{html.escape(quote(link))}'>{html.escape(text)}</a>"

        cells = "".join(
            "<tr>"
            + "".join(f"<td>{c}</td>" for c in [first(i, row[0]), *map(html.escape, row[1:])])
            + "</tr>\n"
            for i, row in enumerate(rows)
        )
        if heading:
            body.append(f"<h2>{html.escape(heading)}</h2>\n")
        body.append(f"<table><thead><tr>{head}</tr></thead><tbody>\n{cells}</tbody></table>\n")
    notes = [note] if isinstance(note, str) else list(note)
    body += [f"<p>{html.escape(n)}</p>\n" for n in notes if n]
    if plots:
        body.append("<h2>Plots</h2>\n")
    for name, caption in plots:
        src = html.escape(quote(name))
        body.append(
            f"<figure><a href='{src}'><img src='{src}' alt='{html.escape(caption)}'></a>"
            f"<figcaption>{html.escape(caption)} ({html.escape(name)})</figcaption></figure>\n"
        )
    style = (
        "table{border-collapse:collapse;font-family:sans-serif}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "img{max-width:100%}figure{margin:1em 0}"
    )
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "".join(body)
        + "</body></html>\n"
    )


def _value(run: Run, key: str) -> Any:
    return run.metrics[key] if key in run.metrics else run.config.get(key)


def _label_row(run: Run, series: Sequence[str], upstream: Mapping[str, Any] | None) -> dict:
    """The ``series`` settings of ``run`` as a label shows them (:func:`_label_value`), those it
    lacks or switched off left out (they say nothing about it); upstream paths and settings
    from ``upstream`` when given (a line over replicates: its upstream runs by whether they
    are set, their paths differ between replicates)."""
    active = _active_config(run)
    row = {}
    for key in series:
        where = upstream if upstream is not None and _is_upstream_setting(key) else active
        if key in where:
            row[key] = _label_value(key, where[key])
    return row


def _series_label(
    run: Run, series: Sequence[str], upstream: Mapping[str, Any] | None = None
) -> str:
    """``name=value, ...`` of the ``series`` config keys of ``run`` (:func:`_short_key`:
    ``method=byol``, ``purifier=none``, ``encoder>max_epochs=800``; :func:`_label_row`)."""
    row = _label_row(run, series, upstream)
    names = _label_names(list(row))
    return ", ".join(f"{names[k]}={v}" for k, v in row.items())


def _is_upstream_setting(key: str) -> bool:
    """A key of :func:`upstream_settings`: an upstream run's setting or a path."""
    return UPSTREAM_SEP in key or _is_upstream(key)


def line_series(
    runs: Sequence[Run], keys: Sequence[str], leave_out: Sequence[str] = ()
) -> list[str]:
    """The keys that tell the lines of :func:`line_data` apart: the differing ``keys`` other than
    the seed, the upstream paths and ``leave_out`` (the x axis), and the upstream settings that
    differ (:func:`upstream_keys`: whether a purifier is set, ``encoder>trainer.max_epochs``),
    so that replicates share a line."""
    own = [k for k in keys if not _is_seed_or_path(k) and k not in leave_out]
    ups = [k for k in upstream_keys(runs) if k.rpartition(UPSTREAM_SEP)[2] not in leave_out]
    return own + ups


# A point of a line: x, the mean over its runs, how many runs, their sample standard deviation
# (0 for one run).
LinePoint = tuple[float, float, int, float]


def line_data(
    runs: Sequence[Run],
    x: str | Sequence[str],
    metrics: Sequence[str],
    series: Sequence[str] | Callable[[Run], Sequence[str]],
) -> dict[tuple[str, str], list[LinePoint]]:
    """What :func:`plot_lines` draws: ``(series label, metric) -> [(x, mean, runs, std)]`` by
    x, the mean and sample standard deviation over the runs that share the setting and x
    (replicate seeds).

    ``x``: a config key or metric, or several metrics of which each run's first present is
    taken. ``series``: the keys that tell lines apart (:func:`line_series`), or those of each
    run; upstream paths and settings in them are read as :func:`_label_row` with
    ``upstream``. A line is labelled by the fewest of those settings that tell the lines apart
    (:func:`_telling_keys`, :data:`_HEADLINE_KEYS` first), not by all of them.
    """
    names = [x] if isinstance(x, str) else list(x)
    found: dict[tuple[tuple[tuple[str, str], ...], str], dict[float, list[float]]] = {}
    order: list[str] = []
    for run in runs:
        xv = next((_value(run, n) for n in names if _value(run, n) is not None), None)
        if not isinstance(xv, int | float) or isinstance(xv, bool):
            continue
        keys = series(run) if callable(series) else series
        order += [k for k in keys if k not in order]
        upstream = _upstream_of(run) if any(map(_is_upstream_setting, keys)) else {}
        setting = tuple(_label_row(run, keys, upstream).items())
        for metric in metrics:
            if metric in run.metrics:
                by_x = found.setdefault((setting, metric), {})
                by_x.setdefault(float(xv), []).append(run.metrics[metric])
    settings = list(dict.fromkeys(setting for setting, _ in found))
    chosen = _telling_keys([dict(s) for s in settings], _by_priority(order))
    shown = _label_names(chosen)
    labels = {
        s: ", ".join(f"{shown[k]}={dict(s)[k]}" for k in chosen if k in dict(s)) for s in settings
    }
    if len(set(labels.values())) < len(labels):  # a setting lacking a key reads like another
        labels = {s: ", ".join(f"{_short_key(k)}={v}" for k, v in s) for s in settings}

    def point(v: float, values: list[float]) -> LinePoint:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return (v, float(np.mean(values)), len(values), std)

    out = {
        (labels[setting], metric): [point(v, by_x[v]) for v in sorted(by_x)]
        for (setting, metric), by_x in found.items()
    }
    return dict(sorted(out.items(), key=lambda item: (_natural(item[0][0]), item[0][1])))


# Descriptions of the metrics drawn against the label fraction, in their legend.
_METRIC_NAMES = {"test/acc": "clean (test/acc)", "shift/mean_acc": "corrupted (shift/mean_acc)"}
_MARKERS = "os^vDP*Xhp<>"
_LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", ":")


def run_styles(keys: Sequence[str]) -> dict[str, dict[str, str]]:
    """A colour, marker and line style per key (a run, a line), in order: tab10's ten
    colours, then ten darker ones of tab20b (dashed, square markers), then (past twenty)
    colours spread over a continuous map; the marker and line style change with every block
    of ten, so that no two keys look alike."""
    import matplotlib
    from matplotlib.colors import to_hex

    tab10, tab20b = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20b"]
    palette = [tab10(i) for i in range(10)]
    palette += [tab20b(i) for i in (0, 4, 8, 12, 16, 2, 6, 10, 14, 18)]
    if len(keys) > len(palette):
        cmap = matplotlib.colormaps["turbo"]
        palette = [cmap(0.05 + 0.9 * i / (len(keys) - 1)) for i in range(len(keys))]
    return {
        key: {
            "color": to_hex(palette[i]),
            "marker": _MARKERS[(i // 10) % len(_MARKERS)],
            "linestyle": _LINESTYLES[(i // 10) % len(_LINESTYLES)],
        }
        for i, key in enumerate(keys)
    }


def plot_lines(
    runs: Sequence[Run],
    x: str | Sequence[str],
    metrics: Sequence[str],
    series: Sequence[str] | Callable[[Run], Sequence[str]],
    path: Path,
    title: str,
) -> Path | None:
    """One line per (series value, metric) of ``metric`` against ``x`` (:func:`line_data`),
    averaged over runs that share both (e.g. seeds), with their standard deviation as error
    bars; against ``subset.fraction``, a log axis ticked at the fractions in %. ``None`` if
    nothing to plot."""
    fraction = x == "subset.fraction"
    xlabel = x if isinstance(x, str) else " / ".join(x)
    if fraction:
        xlabel = "labelled fraction (subset.fraction, %, log scale)"
    return _draw_lines(
        line_data(runs, x, metrics, series), xlabel, title, path, metrics, log_x=fraction
    )


def _draw_lines(
    points: Mapping[tuple[str, str], Sequence[LinePoint]],
    xlabel: str,
    title: str,
    path: Path,
    metrics: Sequence[str] = (),
    log_x: bool = False,
) -> Path | None:
    """The lines of :func:`line_data` in %: a colour and marker per series (:func:`run_styles`),
    a line style per metric (in the order of ``metrics``: the clean accuracy solid, the
    corrupted dashed), error bars of ± one standard deviation over the runs of a point
    (replicate seeds), points nudged sideways so that lines that coincide stay visible; the
    legend beside the axes. With ``log_x`` the x axis is logarithmic and ticked at the x
    values, as % (label fractions). None without any line."""
    if not points:
        return None
    from matplotlib.lines import Line2D

    series = list(dict.fromkeys(label for label, _ in points))
    drawn = list(dict.fromkeys([*[m for m in metrics if any(k[1] == m for k in points)],
                                *[m for _, m in points]]))  # fmt: skip
    styles = run_styles(series)
    dashes = {m: _LINESTYLES[i % len(_LINESTYLES)] for i, m in enumerate(drawn)}
    xs_all = sorted({p[0] for line in points.values() for p in line})
    if log_x:
        decades = math.log10(xs_all[-1] / xs_all[0]) if xs_all[0] > 0 else 1.0
        step = 0.02 * max(decades, 1.0)
    else:
        step = 0.012 * ((xs_all[-1] - xs_all[0]) or 1.0)
    fig, ax = pyplot().subplots(figsize=(6.2, 4.2))
    replicated = any(p[2] > 1 for line in points.values() for p in line)
    for (label, metric), line in points.items():
        shift = (series.index(label) - (len(series) - 1) / 2) * step
        xs = [p[0] * 10**shift if log_x else p[0] + shift for p in line]
        style = styles[label]
        ax.errorbar(
            xs, [100 * p[1] for p in line], yerr=[100 * p[3] for p in line],
            color=style["color"], marker=style["marker"], linestyle=dashes[metric],
            markersize=5, capsize=3, linewidth=1.4, alpha=0.9,
        )  # fmt: skip
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{100 * v:g} %" for v in xs_all])
        ax.minorticks_off()
        ax.set_xlim(xs_all[0] / 10 ** (0.1 * max(decades, 1.0)),
                    xs_all[-1] * 10 ** (0.1 * max(decades, 1.0)))  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    note = "mean ± std over replicate seeds" if replicated else "one run per point"
    ax.set_title(f"{title}\n({note}; points nudged sideways to stay apart)", fontsize=9)
    ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=styles[s]["color"], marker=styles[s]["marker"], label=s)
        for s in series
        if s
    ]
    if len(drawn) > 1 or not handles:
        handles += [
            Line2D([], [], color="0.3", linestyle=dashes[m], label=_METRIC_NAMES.get(m, m))
            for m in drawn
        ]
    return _save_with_legend(fig, [ax], path, handles)


def _save_with_legend(
    fig: Any, axes: Sequence[Any], path: Path, handles: Sequence[Any] | None = None
) -> Path:
    """Save ``fig`` with one legend beside its axes (right of them, outside, so that it covers
    no data): ``handles``, or one entry per label over all ``axes``; the figure is widened by
    the legend's width, in as many columns as its height needs."""
    if handles is None:
        handles, names = [], []
        for ax in axes:
            for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
                if name not in names:
                    handles.append(handle)
                    names.append(name)
    handles = list(handles)
    if not handles:
        return save_figure(fig, path, dpi=120)
    fontsize = 7 if len(handles) > 8 else 8
    width, height = fig.get_size_inches()
    rows = max(1, int((height - 0.3) * 72 / (fontsize * 1.8)))
    legend = fig.legend(
        handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=fontsize,
        ncol=math.ceil(len(handles) / rows), frameon=False,
    )  # fmt: skip
    extent = legend.get_window_extent(fig.canvas.get_renderer())
    extra = extent.width / fig.dpi + 0.3
    fig.set_size_inches(width + extra, height)
    right = width / (width + extra)
    legend.set_bbox_to_anchor((right, 0.5), transform=fig.transFigure)
    return save_figure(fig, path, dpi=120, rect=(0, 0, right, 1))


def severity_key(level: int) -> str:
    """The accuracy at a corruption severity, 0 being the clean images."""
    return "test/acc" if level == 0 else f"shift/severity/{level}/acc"


def _severity_line(
    metrics: Mapping[str, float], section: str, name: str, clean_key: str
) -> tuple[list[int], list[float]] | None:
    """The points (severities, values) of ``<section>/severity/<s>/<name>``, severity 0 being
    ``metrics[clean_key]`` when present; None without a per-severity value."""
    prefix = f"{section}/severity/"
    levels = sorted(
        int(k.split("/")[2])
        for k in metrics
        if k.startswith(prefix) and k.endswith(f"/{name}") and k.count("/") == 3
    )
    if not levels:
        return None
    points = [(s, metrics[f"{prefix}{s}/{name}"]) for s in levels]
    if clean_key in metrics:
        points.insert(0, (0, metrics[clean_key]))
    return [x for x, _ in points], [y for _, y in points]


def severity_data(runs: Sequence[Run]) -> dict[str, tuple[list[int], list[float]]]:
    """What :func:`plot_severity` draws: ``run source -> (severities, accuracies)`` of the
    evaluation runs with a per-severity corruption accuracy, severity 0 being the clean
    accuracy when the run has it."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for run in runs:
        line = _severity_line(run.metrics, "shift", "acc", severity_key(0))
        if line is not None:
            out[run.source] = line
    return out


def plot_severity(runs: Sequence[Run], labels: Mapping[str, str], path: Path) -> Path | None:
    """Accuracy against corruption severity (0 = clean), one line per evaluation run: how each
    pipeline degrades under shift. ``None`` if no run has per-severity accuracies."""
    data = severity_data(runs)
    if not data:
        return None
    fig, ax = _accuracy_lines(
        runs, labels, data, lambda run, x: severity_key(int(x)), lambda run: ""
    )
    ax.set_xlabel("corruption severity (0 = clean)")
    ax.set_xticks(sorted({x for xs, _ in data.values() for x in xs}))
    ax.set_title("mean accuracy over the corruptions (95% CI over the images)", fontsize=10)
    return _save_with_legend(fig, [ax], path)


def calibration_severity_data(
    runs: Sequence[Run],
) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """What :func:`plot_calibration_severity` draws: ``run source -> {"ece": (severities,
    ECEs), "ts_ece": ...}`` of the evaluation runs with a per-severity ECE
    (``calib/severity/<s>/ece``; ``ts_ece`` after temperature scaling, where recorded),
    severity 0 being the clean ECE when the run has it."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for run in runs:
        lines = {}
        for kind in ("ece", "ts_ece"):
            line = _severity_line(run.metrics, "calib", kind, f"calib/clean/{kind}")
            if line is not None:
                lines[kind] = line
        if lines:
            out[run.source] = lines
    return out


def plot_calibration_severity(
    runs: Sequence[Run], labels: Mapping[str, str], path: Path
) -> Path | None:
    """ECE against corruption severity (0 = clean), one line per evaluation run, in two panels
    on one scale: as measured, and after temperature scaling (where recorded); whose
    calibration holds as the shift grows. ``None`` if no run has per-severity ECEs."""
    data = calibration_severity_data(runs)
    if not data:
        return None
    kinds = [k for k in ("ece", "ts_ece") if any(k in lines for lines in data.values())]
    titles = {"ece": "ECE", "ts_ece": "ECE after temperature scaling"}
    sources = sorted(data, key=lambda s: _natural(labels.get(s, s)))
    styles = run_styles(sources)
    fig, axes = pyplot().subplots(
        1, len(kinds), figsize=(4.6 * len(kinds), 4.2), squeeze=False, sharey=True
    )
    for ax, kind in zip(axes[0], kinds, strict=True):
        for source in sources:
            if kind in data[source]:
                xs, ys = data[source][kind]
                ax.plot(xs, ys, markersize=4, label=labels.get(source, source),
                        **styles[source])  # fmt: skip
        ax.set_xlabel("corruption severity (0 = clean)")
        ax.set_xticks(
            sorted({x for lines in data.values() for xs, _ in lines.values() for x in xs})
        )
        ax.set_title(f"{titles[kind]} (mean over the corruptions)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ECE (0 = calibrated)")
    axes[0][0].set_ylim(bottom=0)
    return _save_with_legend(fig, axes[0], path)


def certified_data(runs: Sequence[Run]) -> dict[str, tuple[list[float], list[float]]]:
    """What :func:`plot_certified` draws: ``run source -> (radii, certified accuracies)`` of
    the evaluation runs that certified (``cert/radius/<r>/acc``)."""
    from ssl_robust.evaluate.metrics import certified_radii

    out: dict[str, tuple[list[float], list[float]]] = {}
    for run in runs:
        radii = certified_radii(run.metrics)
        if radii:
            out[run.source] = ([r for r, _ in radii], [run.metrics[k] for _, k in radii])
    return out


def plot_certified(runs: Sequence[Run], labels: Mapping[str, str], path: Path) -> Path | None:
    """Certified accuracy against the L2 radius, one line per certified pipeline (its smoothing
    sigma in the legend). ``None`` if no run certified."""
    data = certified_data(runs)
    if not data:
        return None

    def sigma(run: Run) -> str:
        value = run.metrics.get("cert/sigma")
        return f" (sigma {value:.3g})" if value else ""

    fig, ax = _accuracy_lines(runs, labels, data, lambda run, x: f"cert/radius/{x:g}/acc", sigma)
    ax.set_xlabel("L2 radius (on [0, 1] images)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title("certified accuracy (randomized smoothing; 95% CI over the images)", fontsize=10)
    return _save_with_legend(fig, [ax], path)


def tradeoff_data(runs: Sequence[Run]) -> dict[str, list[tuple[str, float, float]]]:
    """What :func:`plot_tradeoff` draws: per threat (``linf_8``), the (run source, clean
    accuracy, robust accuracy) of every evaluation that has both; threats held by fewer than
    two runs are left out."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    for run in runs:
        if "test/acc" not in run.metrics:
            continue
        for key, value in run.metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "adv" and parts[2] == "acc" and parts[1] != "sanity":
                out.setdefault(parts[1], []).append((run.source, run.metrics["test/acc"], value))
    return {t: sorted(points) for t, points in sorted(out.items()) if len(points) > 1}


def plot_tradeoff(runs: Sequence[Run], labels: Mapping[str, str], path: Path) -> Path | None:
    """Robust against clean accuracy, a panel per threat and a point per evaluated pipeline
    (95 % intervals over the images on both axes), every panel on the same 0-100 % axes: the
    trade-off a purifier's t* or a fine-tuning choice moves along. A threat every pipeline
    falls to (robust accuracy 0) says so in its panel. ``None`` without two pipelines
    attacked alike."""
    from ssl_robust.evaluate.metrics import interval_bars

    data = tradeoff_data(runs)
    if not data:
        return None
    by_source = {r.source: r for r in runs}
    # In the labels' natural order (t_star=20 before t_star=100).
    sources = sorted(
        {s for points in data.values() for s, _, _ in points},
        key=lambda s: _natural(labels.get(s, s)),
    )
    styles = run_styles(sources)
    fig, axes = pyplot().subplots(1, len(data), figsize=(4.4 * len(data), 4.2), squeeze=False)
    for ax, (threat, points) in zip(axes[0], data.items(), strict=True):
        for source, clean, robust in sorted(points, key=lambda p: sources.index(p[0])):
            run = by_source[source]
            xbar = interval_bars(run.metrics, ["test/acc"])
            ybar = interval_bars(run.metrics, [f"adv/{threat}/acc"])
            ax.errorbar(
                [100 * clean], [100 * robust], xerr=100 * xbar, yerr=100 * ybar,
                marker=styles[source]["marker"], color=styles[source]["color"], capsize=3,
                linestyle="none", label=labels.get(source, source), alpha=0.85,
            )  # fmt: skip
        if all(robust == 0 for _, _, robust in points):
            ax.text(
                50, 50, f"robust accuracy 0 % for all {len(points)} runs:\n"
                f"the {threat} attack fooled every attacked image\n(bars: 95% CI upper bounds)",
                ha="center", va="center", fontsize=8, color="0.25",
                bbox={"facecolor": "white", "edgecolor": "0.7", "boxstyle": "round"},
            )  # fmt: skip
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy, {threat} (%)")
        ax.set_title(f"{threat}: clean vs robust (95% CI)", fontsize=10)
        ax.grid(alpha=0.3)
    return _save_with_legend(fig, axes[0], path)


def _accuracy_lines(
    runs: Sequence[Run],
    labels: Mapping[str, str],
    data: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    key: Callable[[Run, float], str],
    suffix: Callable[[Run], str],
) -> tuple[Any, Any]:
    """A figure with one line of accuracies per run (``data``: source -> (xs, accuracies)), in
    percent, each point with its 95 % interval over the images (``key``: the metric of a point),
    a colour, marker and line style per run (:func:`run_styles`), labelled by ``labels`` plus
    ``suffix(run)``; the caller names the axes and saves it (:func:`_save_with_legend`)."""
    from ssl_robust.evaluate.metrics import interval_bars

    by_source = {r.source: r for r in runs}
    sources = sorted(data, key=lambda s: _natural(labels.get(s, s)))
    styles = run_styles(sources)
    fig, ax = pyplot().subplots(figsize=(6.2, 4.2))
    for source in sources:
        xs, ys = data[source]
        run = by_source[source]
        # The 95 % interval over the images of each point, where the run recorded one.
        bars = interval_bars(run.metrics, [key(run, x) for x in xs])
        ax.errorbar(
            xs, [100 * y for y in ys], yerr=100 * bars, capsize=3, markersize=5, alpha=0.85,
            label=labels.get(source, source) + suffix(run), **styles[source],
        )  # fmt: skip
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    return fig, ax


def plot_curves(
    runs: Sequence[Run],
    series: Sequence[str] | Mapping[str, str],
    path: Path,
    metrics: Sequence[str] = CURVE_METRICS,
) -> Path | None:
    """One panel per validation metric in ``metrics`` against epochs, one line per local run
    directory that logged it at least twice (resumed runs stitched), labelled as
    :func:`curve_data` says, each panel's legend below it. ``None`` if no run has such a
    curve."""
    curves = curve_data(runs, series, metrics)
    if not curves:
        return None
    fig, axes = pyplot().subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    legends = []
    for ax, (metric, lines) in zip(axes[0], curves.items(), strict=True):
        styles = run_styles([label for label, _, _ in lines])
        for label, xs, ys in lines:
            style = styles[label] | ({} if len(xs) <= 30 else {"marker": None})
            ax.plot(xs, ys, markersize=3, label=label, **style)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        # Below the panel: a legend inside would cover the curves.
        ncol = 1 if len(lines) <= 6 else 2
        legend = ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, frameon=False
        )
        legends.append(legend)
    renderer = fig.canvas.get_renderer()
    below = max(legend.get_window_extent(renderer).height for legend in legends) / fig.dpi
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + below)
    return save_figure(fig, path, dpi=120)


def curve_data(
    runs: Sequence[Run],
    series: Sequence[str] | Mapping[str, str],
    metrics: Sequence[str] = CURVE_METRICS,
) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """What :func:`plot_curves` draws: ``panel -> [(label, epochs, values)]``, by label; the
    panel is the metric, or ``"<metric> (<phase>)"`` when several phases logged it.

    ``series``: the config keys that label a line, or the labels by run source
    (:func:`run_labels`).
    """
    found: dict[str, dict[str, list[tuple[str, np.ndarray, np.ndarray]]]] = {}
    for run in runs:
        folder = Path(run.source)
        if not (folder / "logs").is_dir():
            continue
        history = read_history(folder, x="epoch")
        if isinstance(series, Mapping):
            label = series.get(run.source, "")
        else:
            label = _series_label(run, series)
        for metric in metrics:
            if metric in history and len(history[metric][0]) >= 2:
                xs, ys = history[metric]
                by_job = found.setdefault(metric, {})
                by_job.setdefault(job_of(run), []).append((label or run.name, xs, ys))
    # A metric that several phases log (a denoiser's and a classifier's val/loss) gets a panel
    # per phase: their scales have nothing in common.
    curves: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for job in (*JOBS, "other"):  # panels in pipeline order
        for metric in metrics:
            by_job = found.get(metric, {})
            if job in by_job:
                key = metric if len(by_job) == 1 else f"{metric} ({job})"
                curves[key] = sorted(by_job[job], key=lambda line: line[0])
    return curves


def add_corruption_errors(runs: Sequence[Run], reference: Run) -> list[str]:
    """Set every evaluation's corruption errors against ``reference`` (an evaluation run):
    ``shift/<corruption>/ce``, ``shift/mce`` and, with both clean accuracies, the relative ones
    (``metrics.corruption_errors``), replacing those the run computed against its own
    ``shift.ce_reference``.

    Returns:
        What could not be computed, in words: runs evaluated on other data than the reference
        (where both reports name it), runs whose grid the reference lacks.

    Raises:
        ValueError: If the reference has no corruption grid.
    """
    from ssl_robust.evaluate.metrics import corruption_errors, grid_accuracies

    ref_cells = grid_accuracies(reference.metrics)
    if not ref_cells:
        raise ValueError(
            f"the corruption-error reference {reference.source} has no corruption accuracies "
            "(shift/<corruption>/<severity>/acc); give an evaluation run with a corruption grid"
        )
    lacking, other_data = [], []
    for run in runs:
        cells = grid_accuracies(run.metrics)
        if not cells:
            continue
        # Errors against the run's own shift.ce_reference go, whether or not they are replaced:
        # the page says what its corruption errors are measured against.
        run.metrics = {
            k: v
            for k, v in run.metrics.items()
            if not (k in ("shift/mce", "shift/relative_mce") or k.endswith(("/ce", "/relative_ce")))
        }
        if run.data and reference.data and run.data != reference.data:
            other_data.append(run.name)
            continue
        if not set(cells) <= set(ref_cells):
            lacking.append(run.name)
            continue
        run.metrics.update(
            corruption_errors(
                cells, ref_cells, run.metrics.get("test/acc"), reference.metrics.get("test/acc")
            )
        )
    notes = []
    if other_data:
        notes.append(
            f"No corruption errors for {', '.join(other_data)}: evaluated on other data than "
            f"the reference {reference.name} ({reference.data})."
        )
    if lacking:
        notes.append(
            f"No corruption errors for {', '.join(lacking)}: the reference {reference.name} was "
            "not evaluated on every cell of their grids."
        )
    return notes


# Evaluations needed on one data and one shift to fit the line of shifted against clean
# accuracy that effective robustness is measured from: two fix any line exactly.
MIN_LINE_RUNS = 3


def _effective_key(measure: str) -> str:
    """``shift/mean_acc`` -> ``shift/effective_robustness``; ``natural/<set>/acc`` ->
    ``natural/<set>/effective_robustness``."""
    if measure == "shift/mean_acc":
        return "shift/effective_robustness"
    return measure.removesuffix("/acc") + "/effective_robustness"


def _grid_label(metrics: dict[str, float]) -> str:
    """The corruption grid behind ``shift/mean_acc``: ``<corruptions> x <severities> grid``
    and a digest of its cells, so that means over different grids are never compared; ""
    when the run lists no cells."""
    from ssl_robust.evaluate.metrics import grid_accuracies

    cells = grid_accuracies(metrics)
    if not cells:
        return ""
    corruptions = {c for c, _ in cells}
    severities = {s for _, s in cells}
    digest = hashlib.sha1(repr(sorted(cells)).encode()).hexdigest()[:6]
    return f"{len(corruptions)} x {len(severities)} grid {digest}"


def accuracy_line_data(
    runs: Sequence[Run],
) -> dict[tuple[str, str], list[tuple[str, float, float]]]:
    """The evaluations' (run source, clean accuracy, shifted accuracy) points by (group,
    shift measure): ``shift/mean_acc`` and each ``natural/<set>/acc`` against ``test/acc``.
    A group holds the runs evaluated on the same data (their ``data`` label) and, for
    ``shift/mean_acc``, over the same corruption grid (whose label ends the group's name).
    Only groups of at least :data:`MIN_LINE_RUNS` runs with two distinct clean accuracies; a
    run listed twice counts once."""
    out: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    seen: set[str] = set()
    for run in runs:
        clean = run.metrics.get("test/acc")
        if clean is None or run.source in seen:
            continue
        seen.add(run.source)
        for key, value in run.metrics.items():
            parts = key.split("/")
            natural = len(parts) == 3 and parts[0] == "natural" and parts[2] == "acc"
            if key == "shift/mean_acc" or natural:
                group = run.data
                if not natural:
                    group = ", ".join(g for g in (run.data, _grid_label(run.metrics)) if g)
                out.setdefault((group, key), []).append((run.source, clean, value))
    return {
        group: sorted(points)
        for group, points in sorted(out.items())
        if len(points) >= MIN_LINE_RUNS and len({c for _, c, _ in points}) > 1
    }


def add_effective_robustness(
    runs: Sequence[Run],
) -> dict[tuple[str, str], tuple[float, float]]:
    """Set each evaluation's effective robustness (Taori et al. 2020) on every shift measure
    of :func:`accuracy_line_data`: its shifted accuracy above the probit-linear fit of shifted
    against clean accuracy through the compared evaluations of its group
    (``metrics.fit_accuracy_line``), as ``shift/effective_robustness`` and
    ``natural/<set>/effective_robustness``, replacing any set before. The line holds every
    compared evaluation, the scored one included: with few runs the values lean towards 0.
    Returns the fitted lines by (group, measure)."""
    from ssl_robust.evaluate.metrics import effective_robustness, fit_accuracy_line

    by_source: dict[str, list[Run]] = {}
    for run in runs:
        run.metrics = {
            k: v for k, v in run.metrics.items() if not k.endswith("/effective_robustness")
        }
        by_source.setdefault(run.source, []).append(run)
    lines = {}
    for (group, measure), points in accuracy_line_data(runs).items():
        _, clean, shifted = (list(v) for v in zip(*points, strict=True))
        line = fit_accuracy_line(clean, shifted)
        lines[group, measure] = line
        ers = effective_robustness(clean, shifted, line)
        for (source, _, _), er in zip(points, ers, strict=True):
            for run in by_source[source]:
                run.metrics[_effective_key(measure)] = float(er)
    return lines


def plot_accuracy_on_the_line(
    runs: Sequence[Run],
    labels: Mapping[str, str],
    lines: Mapping[tuple[str, str], tuple[float, float]],
    path: Path,
) -> Path | None:
    """Shifted against clean accuracy on probit axes, a panel per (data, shift measure), a
    point per evaluated pipeline, with the line fitted through them (solid) and y = x
    (dotted): a point above the line is robust beyond its clean accuracy (Miller et al. 2021,
    "Accuracy on the line"). ``None`` without a fitted line."""
    from ssl_robust.evaluate.metrics import probit

    data = accuracy_line_data(runs)
    groups = [g for g in data if g in lines]
    if not groups:
        return None
    sources = sorted(
        {s for g in groups for s, _, _ in data[g]}, key=lambda s: _natural(labels.get(s, s))
    )
    styles = run_styles(sources)
    fig, axes = pyplot().subplots(1, len(groups), figsize=(4.6 * len(groups), 4.4), squeeze=False)
    ticks = np.array([0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    for ax, group in zip(axes[0], groups, strict=True):
        points = data[group]
        clean = np.array([c for _, c, _ in points])
        shifted = np.array([v for _, _, v in points])
        for source, c, v in sorted(points, key=lambda p: sources.index(p[0])):
            ax.plot(probit([c]), probit([v]), marker=styles[source]["marker"],
                    color=styles[source]["color"], linestyle="none", alpha=0.85,
                    label=labels.get(source, source))  # fmt: skip
        slope, intercept = lines[group]
        lo = float(min(probit(clean).min(), probit(shifted).min())) - 0.3
        hi = float(max(probit(clean).max(), probit(shifted).max())) + 0.3
        xs = np.linspace(lo, hi, 50)
        ax.plot(xs, slope * xs + intercept, "-", color="0.3", linewidth=1,
                label="fit (probit-linear)")  # fmt: skip
        ax.plot(xs, xs, ":", color="0.6", linewidth=1, label="y = x")
        shown = ticks[(probit(ticks) >= lo) & (probit(ticks) <= hi)]
        ax.set_xticks(probit(shown))
        ax.set_xticklabels([f"{100 * t:g}" for t in shown])
        ax.set_yticks(probit(shown))
        ax.set_yticklabels([f"{100 * t:g}" for t in shown])
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        name, measure = group
        ax.set_xlabel("clean accuracy (%, probit scale)")
        ax.set_ylabel(f"{measure} (%, probit scale)")
        ax.set_title(f"{measure} vs clean" + (f"\n({name})" if name else ""), fontsize=9)
        ax.grid(alpha=0.3)
    return _save_with_legend(fig, axes[0], path)


def _nfe_settings(run: Run) -> set[str]:
    """The purifier settings that ``run``'s NFE is a function of, or that its sampler ignores
    (``Purifier.nfe``: ddpm runs t* steps, ddim ``ddim_steps``, oneshot one), left out of the
    label of its line against the NFE: an evaluation's ``purifier`` section (its ``purify``
    keys are its classifier's, filled in), a fine-tuning's ``purify``. A ddim's t* stays: it
    moves the robust accuracy, not the NFE."""
    section = "purifier" if job_of(run) == "evaluate" else "purify"
    sampler = run.config.get(f"{section}.sampler")
    names = {"ddim": ("ddim_steps",), "oneshot": ("ddim_steps",)}.get(
        str(sampler), ("t_star", "sigma", "ddim_steps")
    )
    return {f"{section}.{name}" for name in names}


def nfe_data(runs: Sequence[Run]) -> dict[tuple[str, str], list[LinePoint]]:
    """What :func:`plot_robust_vs_nfe` draws (:func:`line_data`): each attacked evaluation's
    robust accuracies (``adv/<threat>/acc``) against its denoiser evaluations per image
    (:data:`NFE_METRICS`), a line per setting over the replicate seeds and the runs they build
    on, the settings the NFE is made of (:func:`_nfe_settings`) aside; empty without two
    distinct NFEs."""
    attacked = [
        r for r in runs
        if any(m.startswith("adv/") for m in r.metrics) and any(m in r.metrics for m in NFE_METRICS)
    ]  # fmt: skip
    nfes = {next(r.metrics[m] for m in NFE_METRICS if m in r.metrics) for r in attacked}
    if len(nfes) < 2:
        return {}
    adv = sorted(
        {
            m
            for r in attacked
            for m in r.metrics
            if m.startswith("adv/") and m.endswith("/acc") and m.count("/") == 2
            and not m.startswith("adv/sanity/")
        }
    )  # fmt: skip
    series = line_series(attacked, differing_keys(attacked))
    return line_data(
        attacked, NFE_METRICS, adv, lambda run: [k for k in series if k not in _nfe_settings(run)]
    )


def plot_robust_vs_nfe(runs: Sequence[Run], path: Path) -> Path | None:
    """Robust accuracy against the purifier's network evaluations per image (:func:`nfe_data`):
    what robustness each step of the sampler buys. ``None`` without two distinct NFEs."""
    return _draw_lines(
        nfe_data(runs), "denoiser evaluations per image (NFE)",
        "robust accuracy vs the purifier's NFE", path,
    )  # fmt: skip


# What each plot shows, as the comparison pages caption it (by its key in compare's result).
PLOT_CAPTIONS = {
    "plot_accuracy_vs_fraction": "Clean and corrupted accuracy against the label fraction",
    "plot_accuracy_vs_severity": "Accuracy against the corruption severity",
    "plot_calibration_vs_severity": "Calibration (ECE) against the corruption severity",
    "plot_certified_accuracy": "Certified accuracy against the L2 radius",
    "plot_clean_vs_robust": "Clean against robust accuracy, per threat",
    "plot_accuracy_on_the_line": "Shifted against clean accuracy (accuracy on the line)",
    "plot_training_curves": "Validation curves of the training runs",
    "plot_robust_vs_nfe": "Robust accuracy against the purifier's NFE",
}


def _plots(
    runs: Sequence[Run],
    groups: Mapping[str, Sequence[Run]],
    keys_by_job: Mapping[str, Sequence[str]],
    lines: Mapping[tuple[str, str], tuple[float, float]],
    out: Path,
) -> dict[str, Path]:
    """The plots that apply to ``runs`` (grouped by phase, with the keys that differ in each
    and the fitted accuracy lines), written into ``out``, by kind (:data:`PLOT_CAPTIONS`)."""
    written: dict[str, Path] = {}
    # Clean vs corruption accuracy per method (and whatever else differs) against label
    # fraction: from the evaluations when they vary it, else from the fine-tuning runs.
    fraction = "subset.fraction"
    for job in ("evaluate", "finetune"):
        members = groups.get(job, [])
        keys = keys_by_job.get(job, [])
        acc = [m for m in ("test/acc", "shift/mean_acc") if any(m in r.metrics for r in members)]
        if fraction in keys and acc:
            # A line per setting, over the replicate seeds and the runs they build on.
            series = line_series(members, keys, leave_out=(fraction,))
            plot = plot_lines(
                members, fraction, acc, series, out / "accuracy_vs_fraction.png",
                "clean (test/acc) and corrupted (shift/mean_acc) accuracy",
            )  # fmt: skip
            if plot:
                written["plot_accuracy_vs_fraction"] = plot
                break
    labels = run_labels(runs)
    severity = (runs, labels, out / "accuracy_vs_severity.png")
    drawn: list[tuple[str, Callable[..., Path | None], tuple[Any, ...]]] = [
        # How each evaluated pipeline degrades with the corruption severity.
        ("plot_accuracy_vs_severity", plot_severity, severity),
        # How each pipeline's calibration decays with the severity, before and after scaling.
        ("plot_calibration_vs_severity", plot_calibration_severity,
         (runs, labels, out / "calibration_vs_severity.png")),
        # Certified accuracy against the radius, per certified pipeline.
        ("plot_certified_accuracy", plot_certified, (runs, labels, out / "certified_accuracy.png")),
        # Clean against robust accuracy, per threat, a point per evaluated pipeline.
        ("plot_clean_vs_robust", plot_tradeoff, (runs, labels, out / "clean_vs_robust.png")),
        # Shifted against clean accuracy, and the line effective robustness is measured from.
        ("plot_accuracy_on_the_line", plot_accuracy_on_the_line,
         (runs, labels, lines, out / "accuracy_on_the_line.png")),
        # Validation curves of the training runs, side by side.
        ("plot_training_curves", plot_curves, (runs, labels, out / "training_curves.png")),
        # Robust accuracy against the purifier's network evaluations.
        ("plot_robust_vs_nfe", plot_robust_vs_nfe, (runs, out / "robust_vs_nfe.png")),
    ]  # fmt: skip
    for kind, draw, args in drawn:
        plot = draw(*args)
        if plot:
            written[kind] = plot
    return written


def compare(
    sources: Sequence[str | Path] | Sequence[Run],
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    title: str = "Run comparison",
    ce_reference: str | Path | Run | None = None,
) -> dict[str, Path]:
    """Write ``comparison.md``, ``comparison.html`` and the plots that apply into ``out_dir``.

    Args:
        sources: Run directories (or folders holding them), or already loaded :class:`Run`\\ s.
        metrics: Metric columns; by default the standard ones present in any run.
        ce_reference: An evaluation run (or its directory) to compute every evaluation's
            corruption errors (mCE, relative mCE) against (:func:`add_corruption_errors`).

    Returns:
        What was written, by kind: ``markdown``, ``html``, and ``plot_accuracy_vs_fraction`` /
        ``plot_accuracy_vs_severity`` / ``plot_calibration_vs_severity`` /
        ``plot_certified_accuracy`` / ``plot_clean_vs_robust`` / ``plot_accuracy_on_the_line`` /
        ``plot_robust_vs_nfe`` /
        ``plot_training_curves`` when the runs have what those plots need.

    Raises:
        ValueError: If there are no runs.
    """
    runs = [s for s in sources if isinstance(s, Run)]
    paths = [s for s in sources if not isinstance(s, Run)]
    runs += find_runs(paths)
    pending = unfinished_runs(paths)
    if not runs:
        raise ValueError(
            f"no runs (metrics.json / report.json) found in {list(map(str, paths))}"
            + (f"; without results yet: {', '.join(map(str, pending))}" if pending else "")
        )
    notes: list[str] = []
    if pending:
        notes.append(
            f"Not compared: {len(pending)} run director{'ies' if len(pending) > 1 else 'y'} "
            "without results yet (still running, or stopped before the end; rerunning the "
            f"same command resumes): {', '.join(_display_path(p) for p in pending)}."
        )
    if ce_reference is not None:
        reference = ce_reference if isinstance(ce_reference, Run) else load_run(ce_reference)
        notes += add_corruption_errors(runs, reference)
        notes.append(
            f"CE, mCE: corruption errors against {reference.name} (1 = its error; lower is better)."
        )
    # Effective robustness against the line through the compared evaluations.
    lines = add_effective_robustness(runs)
    if lines:
        notes.append(
            "Effective robustness: accuracy under shift above the line fitted through the "
            "compared evaluations on the same data, shifted against clean accuracy in probit "
            "space (Taori et al. 2020; Miller et al. 2021); > 0 is robustness beyond what the "
            "clean accuracy predicts among these pipelines."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if metrics:
        select_metrics(runs, metrics)  # every asked-for metric exists somewhere
    # One table per phase: a pretraining run and an evaluation share few keys, and comparing
    # them key by key would only list every key of both schemas.
    groups = by_job(runs)
    keys_by_job = {job: differing_keys(members) for job, members in groups.items()}
    sections: list[tuple[str | None, list[str], list[list[str]]]] = []
    links: list[list[str | None]] = []  # each row's run name links to its report or curves
    replicated = False
    for job, members in groups.items():
        present = {m for r in members for m in r.metrics}
        columns = [m for m in metrics if m in present] if metrics else select_metrics(members)
        n = len(members)
        heading = f"{job} ({n} run{'s' if n > 1 else ''})" if len(groups) > 1 else None
        sections.append((heading, *table(members, keys_by_job[job], columns)))
        links.append([run_link(r, out) for r in ordered_runs(members, keys_by_job[job])])
        over = replicate_table(members, keys_by_job[job], columns)
        if over is not None:
            replicated = True
            prefix = f"{job}, " if len(groups) > 1 else ""
            sections.append((f"{prefix}mean ± std over replicates", *over))
            links.append([None] * len(over[1]))
    written = {"markdown": out / "comparison.md", "html": out / "comparison.html"}
    written |= _plots(runs, groups, keys_by_job, lines, out)
    plots = [
        (path.name, PLOT_CAPTIONS[kind]) for kind, path in written.items() if kind in PLOT_CAPTIONS
    ]
    # An interval is shown where a run recorded how many images an accuracy is over.
    shown = any(" [" in cell for _, _, rows in sections for row in rows for cell in row[1:])
    if replicated:
        notes.insert(0, REPLICATES_NOTE)
    if shown:
        notes.insert(0, CI_NOTE)
    native = [job for job, keys in keys_by_job.items() if "data.image_size" in keys and any(
        _active_config(r).get("data.image_size") == 0 for r in groups[job])]  # fmt: skip
    if native:
        notes.append(
            f"data.image_size 0 ({', '.join(native)}): the dataset's own size, which those "
            "runs' files do not say; it may equal another run's size."
        )
    md = [f"# {title}\n"]
    if any(metric_unit(h.rsplit(" (", 1)[0]) for _, header, _ in sections for h in header):
        md.append(UNITS_NOTE + "\n")
    md += [
        (f"## {h}\n\n" if h else "") + to_markdown(hd, rows, ln)
        for (h, hd, rows), ln in zip(sections, links, strict=True)
    ]
    md += [note + "\n" for note in notes]
    if plots:
        md.append("## Plots\n")
        md += [f"**{caption}** ([{name}]({quote(name)}))\n\n![{caption}]({quote(name)})\n"
               for name, caption in plots]  # fmt: skip
    write_text_atomic(written["markdown"], "\n".join(md))
    units = [UNITS_NOTE] if len(md) > 1 and md[1] == UNITS_NOTE + "\n" else []
    write_text_atomic(written["html"], to_html(sections, title, notes, links, plots, units))
    return written
