"""Pieces every pipeline uses: run directories, data from the config, final metrics, summaries."""

from __future__ import annotations

import functools
import getpass
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, cast

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from ssl_robust.config import ConfigError, to_dict
from ssl_robust.data.datasets import Splits, build_splits
from ssl_robust.launch.curves import plot_training_curves
from ssl_robust.launch.distributed import local_rank
from ssl_robust.launch.perf import EpochThroughput, FitClock, steady_throughput
from ssl_robust.launch.trainer import (
    fit,
    newest_checkpoint,
    read_json,
    resume_checkpoint,
    resume_requested,
)

console = Console()
Pipeline = TypeVar("Pipeline", bound=Callable[..., dict[str, float]])


SMOKE_ID_ENV = "SSL_ROBUST_SMOKE_ID"


def _launch_id() -> str:
    """One id for every rank of this launch: SLURM's job step, torchrun's run, else the first
    process's pid (exported, so the ranks Lightning starts as child processes inherit it)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '')}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun{os.environ['TORCHELASTIC_RUN_ID']}"
    return os.environ.setdefault(SMOKE_ID_ENV, f"pid{os.getpid()}")


def smoke_in_scratch(pipeline: Pipeline) -> Pipeline:
    """A training pipeline that runs ``trainer.fast_dev_run`` in a scratch run directory,
    removed at the end: a smoke test on an existing run touches nothing of it (no rewritten
    config.yaml or curves, no resume of its checkpoint, no deleted ones with run.resume=false).
    The scratch path is the same for every rank of one launch and differs between jobs,
    launches and users."""

    @functools.wraps(pipeline)
    def run(cfg: DictConfig, *args: Any, **kwargs: Any) -> dict[str, float]:
        if not cfg.trainer.fast_dev_run:
            return pipeline(cfg, *args, **kwargs)
        what = f"{pipeline.__name__} {Path(cfg.run.dir or '.').resolve()} {_launch_id()}"
        key = hashlib.sha1(what.encode()).hexdigest()[:12]
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (some containers)
            user = str(os.getuid())
        scratch = Path(tempfile.gettempdir()) / f"ssl_robust-fast_dev_run-{user}-{key}"
        smoke = cfg.copy()
        with open_dict(smoke):
            smoke.run.dir = str(scratch)
            smoke.run.resume = True  # nothing to resume there, nothing to delete elsewhere
        try:
            return pipeline(smoke, *args, **kwargs)
        finally:
            if local_rank() == 0:  # one process on each node (its /tmp)
                shutil.rmtree(scratch, ignore_errors=True)

    return cast(Pipeline, run)


def run_dir_for(cfg: DictConfig, job: str) -> Path:
    """The run directory: ``run.dir`` or ``runs/<job>-<method>-<data>``."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    parts = [job] + [str(cfg[s].name) for s in ("method", "data") if s in cfg]
    return Path("runs") / "-".join(parts)


def build_data(cfg: DictConfig, run_dir: Path, with_unlabeled: bool = False) -> Splits:
    """The job's data; ``with_unlabeled`` for the self-supervised phases (STL-10's pool)."""
    d = cfg.data
    return build_splits(
        name=d.name,
        root=d.root,
        download=d.download,
        image_size=d.image_size,
        val_fraction=d.val_fraction,
        seed=cfg.run.seed,
        in_memory=d.in_memory,
        skip_bad_images=d.skip_bad_images,
        cache_dir=Path(d.root) / ".cache" if d.name == "imagefolder" else None,
        mean=list(d.mean),
        std=list(d.std),
        with_unlabeled=with_unlabeled,
    )


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        # Hierarchical names only; the LR monitor's "lr-SGD/..." curves stay in the logs.
        if (
            "/" in key
            and not key.startswith("lr-")
            and isinstance(value, torch.Tensor)
            and (value.numel() == 1)
        ):
            out[key] = float(value)
    return out


def print_summary(
    title: str, run_dir: Path, metrics: dict[str, float], extra: dict[str, str]
) -> None:
    # At least as wide as its title, which rich would otherwise fold to the table's width.
    table = Table(title=title, show_header=True, min_width=len(title) + 2)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{metrics[key]:.4g}")
    console.print(table)
    # soft_wrap: a long path stays on one line in a log (rich folds at 80 columns otherwise).
    console.print(f"[bold]Run directory:[/bold] {run_dir.resolve()}", soft_wrap=True)
    for key, value in extra.items():
        # Files written (the encoder, a report) absolute like the run directory above.
        if value and Path(value).exists():
            value = str(Path(value).resolve())
        console.print(f"[bold]{key}:[/bold] {value}", soft_wrap=True)


def write_curves(run_dir: Path, title: str) -> dict[str, str]:
    """``<run_dir>/curves.png`` from the run's logs, as a summary line; a plotting failure
    only warns (the run's results are written before)."""
    try:
        path = plot_training_curves(run_dir, title)
    except Exception as exc:  # a figure must not fail a finished run
        console.print(
            f"[yellow]warning:[/yellow] training curves not drawn: {exc!r}", soft_wrap=True
        )
        return {}
    return {"Curves": str(path)} if path is not None else {}


def fit_resumable(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    run_dir: Path,
    resume: bool,
    best_metric: str | None = None,
    **fit_kwargs: Any,
) -> tuple[dict[str, float], float]:
    """Fit, resuming from the run directory's newest checkpoint when ``resume``.

    Returns the run's metrics (when it resumed, those of an earlier ``metrics.json`` updated
    by this fit's, so a finished run rerun keeps its numbers; a fresh start keeps none;
    ``<best_metric>_best`` from the best-checkpoint callback; ``epochs``;
    ``perf/train_images_per_s``, the median over this fit's epochs after the first) and the
    seconds ``fit`` took.
    """
    ckpt = resume_checkpoint(run_dir, resume)
    if ckpt and trainer.is_global_zero:
        console.print(f"Resuming from {ckpt}", soft_wrap=True)
    start = time.perf_counter()
    fit(trainer, module, ckpt_path=ckpt, **fit_kwargs)
    elapsed = time.perf_counter() - start
    metrics = read_json(run_dir / "metrics.json") if ckpt else {}
    metrics.update(final_metrics(trainer))
    if best_metric is not None:
        best = next(
            (c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == best_metric),
            None,
        )
        score = getattr(best, "best_model_score", None)
        if score is not None:
            metrics[f"{best_metric}_best"] = float(score)
    metrics["epochs"] = float(trainer.current_epoch)
    callbacks = getattr(trainer, "callbacks", [])  # set by the callback connector
    throughput = next((c for c in callbacks if isinstance(c, EpochThroughput)), None)
    if throughput is not None and throughput.images_per_s:
        metrics["perf/train_images_per_s"] = steady_throughput(throughput.images_per_s)
    elif throughput is not None and ckpt and trainer.is_global_zero:
        # A resumed fit that ended no training epoch with a sample in it: it was complete.
        console.print(
            f"{run_dir} is complete ({trainer.current_epoch} epochs): nothing trained; "
            "raise trainer.max_epochs to extend it",
            soft_wrap=True,
        )
    fit_time_s(trainer, metrics)
    return metrics, elapsed


def fit_time_s(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """``perf/fit_time_s``: the seconds in ``fit`` over all the run's pieces (:class:`FitClock`,
    kept in the checkpoints), so a resumed, requeued or finished-and-rerun run counts them all."""
    callbacks = getattr(trainer, "callbacks", [])
    clock = next((c for c in callbacks if isinstance(c, FitClock)), None)
    if clock is not None:
        metrics["perf/fit_time_s"] = clock.total_s


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config (plain data) as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_of(
    config: Mapping[str, Any], sections: tuple[str, ...], free: frozenset[str]
) -> dict[str, Any]:
    """The flattened keys of ``config`` in ``sections``, less those in ``free``, and
    ``run.seed`` (it orders the data and seeds the views and noise): what a resumed run must
    share with its checkpoint (:func:`check_resumable`)."""
    return {
        k: v
        for k, v in flatten(config).items()
        if k == "run.seed" or (k.split(".")[0] in sections and k not in free)
    }


def checkpoint_config(blob: Any, run_dir: Path) -> dict[str, Any] | None:
    """The config a loaded checkpoint was written with (``ConfigInCheckpoint``), else the run
    directory's ``config.yaml`` (checkpoints without it); None when neither is there."""
    config = blob.get("ssl_robust_config") if isinstance(blob, dict) else None
    if isinstance(config, Mapping):
        return dict(config)
    path = run_dir / "config.yaml"
    if path.is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(path))
        return loaded if isinstance(loaded, dict) else None  # type: ignore[return-value]
    return None


# What each job is called in messages.
JOB_NAMES = {
    "pretrain": "pretraining",
    "denoiser": "denoiser",
    "finetune": "fine-tuning",
    "evaluate": "evaluation",
}


def job_of_config(sections: set[str]) -> str | None:
    """The job whose config has these top-level sections (a run directory's config.yaml):
    the one whose own sections (no other job has) are all there; None if none or several."""
    from ssl_robust.config import SCHEMAS

    own = {}
    for job, schema in SCHEMAS.items():
        others: set[str] = set().union(
            *({f.name for f in fields(s)} for j, s in SCHEMAS.items() if j != job)
        )
        own[job] = {f.name for f in fields(schema)} - others
    found = [job for job, names in own.items() if names and names <= sections]
    return found[0] if len(found) == 1 else None


def check_phase(run_dir: Path, job: str) -> None:
    """Before anything is written: refuse a run directory that holds another job's run (its
    config.yaml says which), rather than overwrite its config and metrics, load its checkpoint
    as this job's, or (with run.resume=false) delete its checkpoints."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        loaded = OmegaConf.load(path)
    except Exception:  # an unreadable config.yaml: the job's own checks report it
        return
    if not isinstance(loaded, DictConfig):
        return
    owner = job_of_config({str(k) for k in loaded})
    if owner is not None and owner != job:
        name = JOB_NAMES[owner]
        raise ConfigError(
            f"run.dir {str(run_dir)!r} holds {'an' if name[0] in 'aeiou' else 'a'} {name} run "
            f"(its config.yaml); give this {JOB_NAMES[job]} run another run.dir"
        )


def check_resumable(
    run_dir: Path,
    cfg: DictConfig,
    settings: Callable[[Mapping[str, Any]], dict[str, Any]],
    job: str,
) -> None:
    """Before anything is written: a run that would resume the run directory's checkpoint must
    ask for what that checkpoint was trained as (``settings``: the flattened keys that must
    agree). Another method or width would crash loading the weights, and other
    hyperparameters would be silently ignored or mixed into the old run.

    Raises:
        ConfigError: Naming each differing key, old -> new, and the ways out.
    """
    ckpt = newest_checkpoint(run_dir) if resume_requested(bool(cfg.run.resume)) else None
    if ckpt is None:
        return
    blob = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    epoch = blob.get("epoch") if isinstance(blob, dict) else None
    max_epochs = int(cfg.trainer.max_epochs)
    if isinstance(epoch, int) and max_epochs <= epoch:
        # Lightning would end at once, and config.yaml would say max_epochs beside the
        # results of more epochs.
        raise ConfigError(
            f"{str(run_dir)!r} holds a {job} checkpoint ({Path(ckpt).name}) already in epoch "
            f"{epoch + 1}; trainer.max_epochs={max_epochs} cannot take that back: give "
            f"trainer.max_epochs >= {epoch + 1} to resume or extend it, run.resume=false to "
            "train anew in this directory, or another run.dir"
        )
    old = checkpoint_config(blob, run_dir)
    if old is None:
        return
    before, now = settings(old), settings(to_dict(cfg))
    # A key an older run's config lacks cannot be compared.
    diff = {k: (before[k], v) for k, v in now.items() if k in before and before[k] != v}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(
            f"{str(run_dir)!r} holds a {job} checkpoint ({Path(ckpt).name}) trained with other "
            f"settings ({changes}); resuming it would ignore them. Use run.resume=false to "
            "train anew in this directory, or another run.dir"
        )


def check_denoiser_size(
    unet: Any, image_size: int, key: str, run: str, images: str, fix: str
) -> None:
    """The denoiser of ``key=run`` must work on the ``images`` (3-channel, ``image_size`` px).

    Raises:
        ConfigError: Naming both sizes and the way out (``fix``).
    """
    size = unet.config["sample_size"]
    size = size if isinstance(size, int) else size[0]
    channels = unet.config["in_channels"]
    if size != image_size or channels != 3:
        kind = f"{size}-px" if channels == 3 else f"{size}-px {channels}-channel"
        raise ConfigError(
            f"{key}={run!r} holds a denoiser of {kind} images, the {images} are "
            f"{image_size} px: {fix}"
        )
