"""Pieces every pipeline uses: run directories, data from the config, final metrics, summaries."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from ssl_robust.data.datasets import Splits, build_splits

console = Console()


def run_dir_for(cfg: DictConfig, job: str) -> Path:
    """The run directory: ``run.dir`` or ``runs/<job>-<method>-<data>``."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    parts = [job] + [str(cfg[s].name) for s in ("method", "data") if s in cfg]
    return Path("runs") / "-".join(parts)


def build_data(cfg: DictConfig, run_dir: Path) -> Splits:
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
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{metrics[key]:.4g}")
    console.print(table)
    console.print(f"[bold]Run directory:[/bold] {run_dir.resolve()}")
    for key, value in extra.items():
        console.print(f"[bold]{key}:[/bold] {value}")
