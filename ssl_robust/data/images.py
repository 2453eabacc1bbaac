"""A LightningDataModule of plain images in [0, 1] (what the denoiser trains on).

Batches are ``(images, labels)`` with ``images`` a ``(B, C, H, W)`` float tensor in [0, 1]:
no normalisation, the DDPM maps [0, 1] to [-1, 1] itself. Training images may be flipped
horizontally; validation images are never augmented.

Like :class:`ssl_robust.data.datamodule.SSLDataModule`, the training order and each image's flip
are a pure function of ``(seed, epoch, index)``, so a run resumed at epoch k sees exactly the
batches an uninterrupted run sees.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ssl_robust.data.datamodule import SpreadOrder, eval_loader, seeded_train_loader, worker_options
from ssl_robust.data.datasets import ImageSource, TransformDataset


def image_transform(hf_prob: float = 0.0) -> T.Compose:
    """PIL RGB image -> (3, H, W) float tensor in [0, 1], flipped with probability ``hf_prob``."""
    if not 0.0 <= hf_prob <= 1.0:
        raise ValueError(f"hf_prob must be in [0, 1], got {hf_prob}")
    steps: list[Any] = [T.RandomHorizontalFlip(hf_prob)] if hf_prob > 0 else []
    return T.Compose([*steps, T.ToTensor()])


class ImageDataModule(pl.LightningDataModule):
    """Train and val splits as [0, 1] image batches.

    Args:
        train: Training source (e.g. ``Splits.train`` of ``build_splits``).
        val: Validation source.
        batch_size: Training batch size per device (the last incomplete batch is dropped).
        eval_batch_size: Validation batch size per device.
        num_workers: DataLoader worker processes.
        seed: Seeds the training order and the flips.
        hf_prob: Probability of a horizontal flip of a training image.
        channels_last: Hand batches to the model in channels-last memory format.
    """

    def __init__(
        self,
        train: ImageSource,
        val: ImageSource,
        batch_size: int,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        hf_prob: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(
                f"batch sizes must be >= 1, got batch_size={batch_size}, "
                f"eval_batch_size={eval_batch_size}"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if len(train) < batch_size:
            raise ValueError(
                f"the training split has {len(train)} images, fewer than one batch of "
                f"{batch_size}; lower data.batch_size"
            )
        if len(val) == 0:
            raise ValueError("the validation split is empty")
        self.train_source = train
        self.val_source = val
        self.train_transform = image_transform(hf_prob)
        self.eval_transform = image_transform(0.0)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.channels_last = channels_last

    def train_dataloader(self) -> DataLoader:
        ds = TransformDataset(self.train_source, self.train_transform, seed=self.seed)
        return seeded_train_loader(
            self,
            ds,
            self.batch_size,
            self.seed,
            **worker_options(self.num_workers),
        )

    def val_dataloader(self) -> DataLoader:
        ds = TransformDataset(self.val_source, self.eval_transform)
        return eval_loader(ds, self.eval_batch_size, self.num_workers)

    def val_images(self, n: int) -> torch.Tensor:
        """The first ``n`` validation images in :class:`SpreadOrder` (a sample of every class
        rather than the first class of a tree), (n, C, H, W) in [0, 1]: fixed images for grids."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        order = SpreadOrder(len(self.val_source)).order[:n]
        return torch.stack([self.eval_transform(self.val_source.load(i)) for i in order])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.channels_last:
            return batch
        x, y = batch
        return x.contiguous(memory_format=torch.channels_last), y
