"""A figure of what a pretraining run's encoder learns from: the first training batch's views.

Augmentations are easy to get subtly wrong (a crop range, a colour order, a denoiser that
returns noise), and a picture shows it faster than any metric. The views are taken where the
encoder gets them: after the loader's transforms, the device-side augmentation
(``data.augment=gpu``) and the denoised views, un-normalised for display.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger

from ssl_robust.plotting import ImageRow, plot_image_grid

__all__ = ["ViewsFigure"]


class ViewsFigure(Callback):
    """Writes ``path`` (a PNG) from the first training batch of a fresh run, on rank 0: the
    first ``n`` images, one row per view, each column titled with the image's class.

    A resumed run (global step > 0) keeps the figure it has. With a wandb logger the figure
    is logged too (``views``). A failure to draw warns and never stops training.

    Args:
        path: The PNG to write.
        mean: Per-channel mean the views were normalised with.
        std: Per-channel std.
        classes: Class names, for the column titles (unlabeled images, label -1, get none).
        row_names: A name per view (default ``view 1``, ``view 2``, ...).
        n: Images shown.
    """

    def __init__(
        self,
        path: Path,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str] = (),
        row_names: Sequence[str] = (),
        n: int = 8,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.path = Path(path)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.classes = [str(c) for c in classes]
        self.row_names = list(row_names)
        self.n = n
        self.done = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.done or trainer.global_step > 0 or not trainer.is_global_zero:
            return
        self.done = True
        try:
            path = self.draw(batch)
            for logger in trainer.loggers:  # beside the run's curves in wandb
                if isinstance(logger, WandbLogger):
                    logger.log_image(key="views", images=[str(path)], step=0)
        except Exception as err:  # a figure must never end a training run
            warnings.warn(f"could not draw {self.path}: {err}", stacklevel=1)

    def draw(self, batch: Any) -> Path:
        """Draw the figure from a ``(views, labels)`` batch of normalised (B, C, H, W) views."""
        views, labels = batch
        labels = labels[: self.n].detach().cpu()
        rows = []
        for i, v in enumerate(views):
            x = v[: self.n].detach().float().cpu() * self.std + self.mean
            name = self.row_names[i] if i < len(self.row_names) else f"view {i + 1}"
            rows.append(ImageRow(name, x.clamp(0, 1)))

        def title(c: int) -> str:
            return self.classes[c] if 0 <= c < len(self.classes) else ""

        return plot_image_grid(
            rows,
            labels,
            self.classes,
            self.path,
            column_titles=[title(int(c)) for c in labels],
            title="the first training batch's views, as the encoder gets them",
        )
